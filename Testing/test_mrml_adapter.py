"""MRML adapter against real MRML (slicer-core) and real files: geometry to 1e-6 mm,
engine output -> segmentation node, labeled slices, terminology, refusal of bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "HFSAMSegment"))

slicer = pytest.importorskip("slicer")  # slicer-core: real MRML classes, no Slicer application

from HFSAMSegmentLib import mrml_adapter, selftest  # noqa: E402
from HFSAMSegmentLib.errors import UserInputError  # noqa: E402
from HFSAMSegmentLib.terminology import Terminology, find_term_file, load_into_slicer, normalize_name  # noqa: E402

FLIP = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture()
def scene():
    scene, keep = selftest.make_bare_scene()
    yield scene
    scene.Clear(1)
    del keep


def segment_names(node):
    seg = node.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def counts_by_name(node, volume):
    seg = node.GetSegmentation()
    return {
        seg.GetNthSegment(i).GetName(): selftest.segment_voxel_count(node, seg.GetNthSegmentID(i), volume)
        for i in range(seg.GetNumberOfSegments())
    }


# -- geometry ------------------------------------------------------------------------------


def test_geometry_round_trip_scenario(scene, tmp_path):
    result = selftest.geometry_round_trip(scene, tmp_path)
    assert result["path"].name == "round_trip.nrrd"
    assert [p.name for p in tmp_path.iterdir()] == ["round_trip.nrrd"]  # no temp file left


def test_real_ct_round_trip_keeps_the_file_geometry(scene, ct3mm, tmp_path):
    original = sitk.ReadImage(str(ct3mm / "image.nii.gz"))
    node = mrml_adapter.import_volume(ct3mm / "image.nii.gz", scene)
    assert mrml_adapter.node_array(node).shape == (30, 101, 122)
    exported = sitk.ReadImage(str(mrml_adapter.export_volume(node, tmp_path / "ct.nrrd")))
    np.testing.assert_allclose(exported.GetOrigin(), original.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(exported.GetSpacing(), original.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(exported.GetDirection(), original.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(original))
    # Slicer's RAS: the node's origin is the file's LPS origin with x and y negated.
    np.testing.assert_allclose(node.GetOrigin(), FLIP @ np.array(original.GetOrigin()), atol=1e-6)


def test_dicom_labels_land_by_physical_position_not_by_array_index(scene, ctdicom, tmp_path):
    """The DICOM labels are stored y-flipped (data README): the segments must match a physical resampling."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ctdicom / "dicom")))
    image = reader.Execute()
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    volume = mrml_adapter.import_volume(tmp_path / "ct.nrrd", scene)
    labels = sitk.ReadImage(str(ctdicom / "labels_synapse8.nii.gz"))
    assert not np.allclose(labels.GetDirection(), image.GetDirection())  # the trap is really there

    node = mrml_adapter.import_segmentation(
        ctdicom / "labels_synapse8.nii.gz",
        scene,
        volume,
        sidecar={"classes": [{"value": 1, "name": "spleen"}, {"value": 5, "name": "liver"}]},
    )
    expected = sitk.GetArrayFromImage(sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    seg = node.GetSegmentation()
    for value, name in ((1, "spleen"), (5, "liver")):
        got = mrml_adapter.merged_labels(node, [seg.GetSegmentIdBySegmentName(name)], volume)
        assert int((expected == value).sum()) > 1000
        assert np.array_equal(got > 0, expected == value), f"{name} is not where the labels put it"
        assert not np.array_equal(got > 0, sitk.GetArrayFromImage(labels) == value)  # pairing arrays would be wrong


def test_sidecar_path_matches_the_engine():
    assert mrml_adapter.sidecar_path("/x/seg.nrrd") == Path("/x/seg.json")
    assert mrml_adapter.sidecar_path("/x/seg.nii.gz") == Path("/x/seg.json")
    assert mrml_adapter.sidecar_path("/x/a.b.seg.nrrd") == Path("/x/a.b.json")


def test_slice_axis_follows_the_patient_axis_not_the_array_order(scene):
    # A sagittal acquisition: I runs anterior, J superior, K right. Slices are counted along J.
    directions = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)
    geometry = mrml_adapter.Geometry(np.zeros(3), np.array([1.0, 1.0, 3.0]), directions)
    volume, _ = selftest.make_volume(scene, shape=(5, 6, 7), geometry=geometry)
    assert mrml_adapter.Geometry.of_node(volume).slice_axis() == 1
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    sid = node.GetSegmentation().AddEmptySegment("", "vertebra", (1, 1, 1))
    mask = np.zeros((5, 6, 7), np.uint8)
    mask[:, 2, :] = 1  # numpy [k, j, i]: J index 2
    mask[1, 4, 3] = 1  # and one voxel at J 4
    selftest.paint_mask(node, sid, volume, mask)
    found = mrml_adapter.labeled_slices(node, [sid], volume)
    assert (found.axis, found.slices) == (1, [2, 4])


# -- engine output -> segmentation ----------------------------------------------------------------


def test_label_import_scenario(scene, tmp_path):
    result = selftest.label_import(scene, tmp_path)
    node = result["segmentation"]
    assert node.GetDisplayNode().GetVisibility2D() and node.GetDisplayNode().GetVisibility()
    # The temporary labelmap node used for the import is gone.
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0


def test_engine_output_of_the_real_ct(scene, ct3mm, tmp_path):
    """The reference Synapse labels written as engine output: every organ's voxel count survives."""
    volume = mrml_adapter.import_volume(ct3mm / "image.nii.gz", scene)
    presets = json.loads((REPO / "Resources" / "class_presets.json").read_text())["presets"]["synapse"]["classes"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ct3mm / "labels_synapse8.nii.gz")))
    node = mrml_adapter.import_segmentation(
        ct3mm / "labels_synapse8.nii.gz", scene, volume, sidecar={"classes": presets}, terminology=Terminology.default()
    )
    names = [c["name"] for c in presets]
    assert segment_names(node) == names
    counts = counts_by_name(node, volume)
    assert counts == {c["name"]: int((labels == c["value"]).sum()) for c in presets}
    seg = node.GetSegmentation()
    for cls in presets:
        segment = seg.GetSegment(seg.GetSegmentIdBySegmentName(cls["name"]))
        np.testing.assert_allclose(segment.GetColor(), np.array(cls["color"]) / 255.0, atol=1e-6)
        assert cls["type"]["code"] in mrml_adapter.segment_terminology(segment)


def test_writing_into_an_existing_segmentation_replaces_only_same_named_segments(scene, tmp_path):
    volume, _ = selftest.make_volume(scene, shape=(4, 10, 12))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my work")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    liver = node.GetSegmentation().AddEmptySegment("", "liver", (1, 0, 0))
    tumour = node.GetSegmentation().AddEmptySegment("", "my tumour", (0, 1, 0))
    selftest.paint_slices(node, liver, volume, [0, 1, 2, 3])
    tumour_voxels = selftest.paint_slices(node, tumour, volume, [2], box=(slice(0, 2), slice(0, 2)))

    labels = np.zeros((4, 10, 12), np.uint8)
    labels[1, 5:7, 5:8] = 1  # the model's liver: 6 voxels
    path = selftest.write_engine_output(
        tmp_path,
        labels,
        mrml_adapter.Geometry.of_node(volume),
        [{"value": 1, "name": "liver", "color": [221, 130, 101]}],
    )
    same = mrml_adapter.import_segmentation(path, scene, volume, segmentation_node=node)
    assert same is node
    assert segment_names(node) == ["liver", "my tumour"]
    assert node.GetSegmentation().GetSegmentIdBySegmentName("liver") == liver  # same segment, new content
    assert counts_by_name(node, volume) == {"liver": 6, "my tumour": tumour_voxels}


def test_segmentation_is_placed_under_the_volumes_transform(scene, tmp_path):
    volume, _ = selftest.make_volume(scene, shape=(4, 10, 12))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    matrix.SetElement(1, 3, -7.5)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    labels = np.zeros((4, 10, 12), np.uint8)
    labels[2, 3:5, 4:9] = 1
    path = selftest.write_engine_output(
        tmp_path, labels, mrml_adapter.Geometry.of_node(volume), [{"value": 1, "name": "liver"}]
    )
    node = mrml_adapter.import_segmentation(path, scene, volume)
    assert node.GetTransformNodeID() == transform.GetID()
    sid = node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    assert np.array_equal(mrml_adapter.merged_labels(node, [sid], volume), labels)


def test_bad_label_files_are_refused(scene, tmp_path):
    volume, _ = selftest.make_volume(scene, shape=(3, 5, 6))
    geometry = mrml_adapter.Geometry.of_node(volume)
    fractional = sitk.GetImageFromArray(np.full((3, 5, 6), 0.5, np.float32))
    geometry.apply_to_image(fractional)
    sitk.WriteImage(fractional, str(tmp_path / "prob.nrrd"))
    with pytest.raises(UserInputError, match="not a label map"):
        mrml_adapter.import_segmentation(tmp_path / "prob.nrrd", scene, volume, sidecar={"classes": []})
    with pytest.raises(UserInputError, match="did not write"):
        mrml_adapter.import_segmentation(tmp_path / "missing.nrrd", scene, volume)
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


# -- writing files ---------------------------------------------------------------------------------


def test_export_never_overwrites_unless_asked_and_is_atomic(scene, tmp_path):
    volume, array = selftest.make_volume(scene, shape=(2, 3, 4))
    target = tmp_path / "v.nrrd"
    target.write_bytes(b"precious")
    with pytest.raises(UserInputError, match="already exists"):
        mrml_adapter.export_volume(volume, target)
    assert target.read_bytes() == b"precious"
    mrml_adapter.export_volume(volume, target, overwrite=True)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(target))), array)
    with pytest.raises(UserInputError, match="does not exist"):
        mrml_adapter.export_volume(volume, tmp_path / "no" / "such" / "dir.nrrd")
    with pytest.raises(RuntimeError):  # SimpleITK has no writer for this: nothing may be left behind
        mrml_adapter.export_volume(volume, tmp_path / "v.unknownformat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nrrd"]


def test_vector_and_empty_volumes_are_refused(scene, tmp_path):
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(image)
    with pytest.raises(UserInputError, match="3 components per voxel"):
        mrml_adapter.export_volume(rgb, tmp_path / "rgb.nrrd")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(UserInputError, match="has no voxels"):
        mrml_adapter.export_volume(empty, tmp_path / "empty.nrrd")
    assert list(tmp_path.iterdir()) == []


# -- labeled slices ------------------------------------------------------------------------------


def test_labeled_slices_scenario(scene, tmp_path):
    result = selftest.labeled_slices(scene, tmp_path)
    assert result["written"].slices == [1, 4, 5] and result["written"].path.is_file()


def test_labeled_slices_of_the_real_labels(scene, ct3mm):
    """Slice counts per organ from the data README: liver 30, gallbladder 13, pancreas 18."""
    volume = mrml_adapter.import_volume(ct3mm / "image.nii.gz", scene)
    node = mrml_adapter.import_segmentation(
        ct3mm / "labels_synapse8.nii.gz",
        scene,
        volume,
        sidecar={
            "classes": [
                {"value": 4, "name": "gallbladder"},
                {"value": 5, "name": "liver"},
                {"value": 8, "name": "pancreas"},
            ]
        },
    )
    seg = node.GetSegmentation()
    found = {
        name: mrml_adapter.labeled_slices(node, [seg.GetSegmentIdBySegmentName(name)], volume)
        for name in ("liver", "gallbladder", "pancreas")
    }
    assert {name: len(f.slices) for name, f in found.items()} == {"liver": 30, "gallbladder": 13, "pancreas": 18}
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ct3mm / "labels_synapse8.nii.gz")))
    assert found["pancreas"].slices == [int(k) for k in np.flatnonzero((labels == 8).any(axis=(1, 2)))]


def test_training_labels_refuse_empty_or_missing_segments(scene, tmp_path):
    result = selftest.labeled_slices(scene)
    node, volume = result["segmentation"], result["volume"]
    with pytest.raises(UserInputError, match="'aorta' have no painted voxels"):
        mrml_adapter.export_training_labels(
            node, [*result["segment_ids"], result["unused"]], volume, tmp_path / "l.nrrd"
        )
    with pytest.raises(UserInputError, match="no segments chosen"):
        mrml_adapter.labeled_slices(node, [], volume)
    with pytest.raises(UserInputError, match="is not in"):
        mrml_adapter.labeled_slices(node, ["no-such-segment"], volume)
    with pytest.raises(UserInputError, match="no segmentation selected"):
        mrml_adapter.labeled_slices(None, ["x"], volume)
    assert list(tmp_path.iterdir()) == []


# -- terminology -------------------------------------------------------------------------------------


def test_terminology_file_loads_in_slicers_terminology_logic_and_strings_match():
    path = find_term_file()
    assert path == REPO / "Resources" / "HFSAM.term.json"
    table = Terminology.from_file(path)
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(path)) == table.context
    doc = json.loads(path.read_text())
    labels = []
    for type_ in doc["SegmentationCodes"]["Category"][0]["Type"]:
        labels += [m["3dSlicerLabel"] for m in type_.get("Modifier", [])] or [type_["3dSlicerLabel"]]
    assert len(labels) == 11  # 8 Synapse organs + 3 ACDC structures
    for label in labels:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(table.context, label, entry), label
        assert table.lookup(label).serialized == logic.SerializeTerminologyEntry(entry), label
        parsed = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(table.lookup(label).serialized, parsed)


def test_every_engine_class_name_has_the_engines_codes():
    table = Terminology.default()
    presets = json.loads((REPO / "Resources" / "class_presets.json").read_text())["presets"]
    for preset in presets.values():
        for cls in preset["classes"]:
            for name in [cls["name"], *cls.get("aliases", [])]:
                entry = table.lookup(name)
                assert entry is not None, f"{name!r} has no terminology entry"
                assert f"^{cls['type']['code']}^" in entry.serialized, (name, entry.serialized)
                if cls.get("modifier"):
                    assert f"^{cls['modifier']['code']}^" in entry.serialized, (name, entry.serialized)
    assert normalize_name(" Kidney_Right ") == "kidney right"


def test_the_terminology_tag_is_the_one_slicer_5_8_reads():
    """vtkSegment.SetTerminology/GetTerminology exist only from Slicer 5.10 (they wrap this same tag)."""
    segment = slicer.vtkSegment()
    entry = Terminology.default().lookup("liver").serialized
    mrml_adapter.set_segment_terminology(segment, entry)
    value = vtk.reference("")
    assert segment.GetTag("TerminologyEntry", value) and str(value) == entry  # Slicer's tag name
    assert mrml_adapter.segment_terminology(segment) == entry == segment.GetTerminology()  # 5.10+ agrees
    fresh = slicer.vtkSegment()  # a new segment carries Slicer's default entry ("Tissue")
    assert mrml_adapter.segment_terminology(fresh) == fresh.GetTerminology() and "85756007" in fresh.GetTerminology()


def test_the_terminology_is_loaded_into_slicer_once():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()

    def loaded():
        names = vtk.vtkStringArray()
        logic.GetLoadedTerminologyNames(names)
        return [names.GetValue(i) for i in range(names.GetNumberOfValues())]

    before = loaded()
    context = load_into_slicer(logic)
    assert context == Terminology.default().context and loaded() == before + [context]
    assert load_into_slicer(logic) == context and loaded() == before + [context]  # not loaded twice


def test_a_failed_import_leaves_no_half_filled_segmentation(scene, tmp_path, monkeypatch):
    volume, _ = selftest.make_volume(scene, shape=(3, 6, 7))
    labels = np.zeros((3, 6, 7), np.uint8)
    labels[1, 2:4, 2:5] = 1
    path = selftest.write_engine_output(
        tmp_path, labels, mrml_adapter.Geometry.of_node(volume), [{"value": 1, "name": "liver"}]
    )

    def slicer_5_8(segment, serialized):  # what vtkSegment.SetTerminology did on Slicer 5.8
        raise AttributeError("'vtkSegmentationCore.vtkSegment' object has no attribute 'SetTerminology'")

    monkeypatch.setattr(mrml_adapter, "set_segment_terminology", slicer_5_8)
    before = scene.GetNumberOfNodes()
    with pytest.raises(AttributeError):
        mrml_adapter.import_segmentation(path, scene, volume, terminology=Terminology.default())
    assert scene.GetNumberOfNodes() == before
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_labeled_slices_read_each_segments_own_labelmap_and_agree_with_resampling(scene, ct3mm):
    volume = mrml_adapter.import_volume(ct3mm / "image.nii.gz", scene)
    classes = [{"value": v, "name": n} for v, n in ((1, "spleen"), (4, "gallbladder"), (5, "liver"), (8, "pancreas"))]
    node = mrml_adapter.import_segmentation(
        ct3mm / "labels_synapse8.nii.gz", scene, volume, sidecar={"classes": classes}
    )
    seg = node.GetSegmentation()
    axis = mrml_adapter.Geometry.of_node(volume).slice_axis()
    for ids in (
        [seg.GetSegmentIdBySegmentName("gallbladder")],
        [seg.GetSegmentIdBySegmentName(n) for n in ("liver", "spleen", "pancreas")],
    ):
        fast = mrml_adapter._slices_on_the_volume_grid(node, ids, volume, axis)
        assert fast is not None, "segments on the volume's grid must not be resampled"
        merged = mrml_adapter.merged_labels(node, ids, volume)
        assert fast[0] == mrml_adapter.slices_with_labels(merged, axis)
        if len(ids) == 1:
            assert fast[1] == [int(np.count_nonzero(merged))]
    # A segmentation under another transform than the volume: resampled, and still right.
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    gallbladder = [seg.GetSegmentIdBySegmentName("gallbladder")]
    assert mrml_adapter._slices_on_the_volume_grid(node, gallbladder, volume, axis) is None
    assert len(mrml_adapter.labeled_slices(node, gallbladder, volume).slices) == 13


def test_a_finished_run_imports_nothing_once_its_volume_left_the_scene(scene, tmp_path):
    """The scene was closed while the engine ran: the result must not land in the next scene."""
    from HFSAMSegmentLib.engine_command import Engine
    from HFSAMSegmentLib.jobs import SegmentJob
    from HFSAMSegmentLib.process_runner import RunResult

    volume, _ = selftest.make_volume(scene, shape=(2, 5, 6))
    labels = np.ones((2, 5, 6), np.uint8)
    path = selftest.write_engine_output(
        tmp_path, labels, mrml_adapter.Geometry.of_node(volume), [{"value": 1, "name": "liver"}]
    )
    job = SegmentJob(Engine(sys.executable), scene, volume, ["--adapter", "x"])
    job.output_path = path
    scene.RemoveNode(volume)
    outcome = job._collect(RunResult("done", 0, result={"output": str(path)}))
    assert outcome.status == "cancelled" and "left the scene" in outcome.message
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
