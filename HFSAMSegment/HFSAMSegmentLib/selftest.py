"""The module's test scenarios, shared by CI (pytest + slicer-core) and Slicer's self-test.

Each scenario builds its own small data in the given scene (no downloads, no
sample data needed inside Slicer), checks values, and raises AssertionError
with a clear message when something is off. ``Testing/test_*.py`` calls the
same functions (plus finer checks), and ``HFSAMSegmentTest`` in
HFSAMSegment.py runs ``SCENARIOS`` inside a real Slicer: one set of scenarios,
two hosts. The engine scenarios (Segment, Fine-tune, Cancel) run the real
engine with the random tiny model and write only into their own folder (a
private model library included), never into the user's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import mrml_adapter
from .engine_command import Engine
from .library_bridge import TINY_TEST_ARGS, LibraryBridge
from .terminology import Terminology

TOLERANCE_MM = 1e-6


def make_bare_scene():
    """A scene wired like Slicer's, for plain Python (CI): segmentation logic (converter rules) and
    subject hierarchy logic. Returns (scene, logics); keep ``logics`` alive as long as the scene."""
    import slicer

    scene = slicer.vtkMRMLScene()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)  # registers the labelmap <-> surface converter rules
    subject_hierarchy = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    subject_hierarchy.SetMRMLScene(scene)
    return scene, (segmentations, subject_hierarchy)


def oblique_geometry() -> mrml_adapter.Geometry:
    """Rotated 30 deg about S and 10 deg about R, anisotropic spacing, off-centre origin: nothing is identity."""
    a, b = np.deg2rad(30.0), np.deg2rad(10.0)
    rot_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return mrml_adapter.Geometry(np.array([-112.5, 37.25, -501.0]), np.array([0.78, 0.91, 2.5]), rot_r @ rot_s)


def make_volume(scene, shape=(7, 20, 24), name="HFSAM test volume", geometry=None, seed=0):
    """A CT-like int16 volume node [k, j, i] with an oblique geometry."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1500, size=shape, dtype=np.int16)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    mrml_adapter.set_node_array(node, array, geometry or oblique_geometry())
    return node, array


def slicer_sh(scene):
    import slicer

    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def put_in_study(scene, volume_node) -> int:
    """Move the volume into a new patient/study folder of the subject hierarchy, as DICOM loading does.

    Returns the study item.
    """
    sh = slicer_sh(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "HFSAM test patient")
    study = sh.CreateStudyItem(patient, "HFSAM test study")
    item = sh.GetItemByDataNode(volume_node)
    if item:  # inside Slicer every node already has an item
        sh.SetItemParent(item, study)
    else:  # a bare scene has no subject-hierarchy plugins that create items
        sh.CreateItem(study, volume_node)
    return study


def segment_voxel_count(segmentation_node, segment_id, reference_volume) -> int:
    """Voxels of one segment, counted by exporting it back to a labelmap on the volume's grid."""
    return int(np.count_nonzero(mrml_adapter.merged_labels(segmentation_node, [segment_id], reference_volume)))


def _assert_close(actual, expected, what):
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    error = float(np.max(np.abs(actual - expected)))
    assert error <= TOLERANCE_MM, f"{what}: {actual.tolist()} != {expected.tolist()} (max error {error:g})"


# -- scenarios ---------------------------------------------------------------------------------
def geometry_round_trip(scene, folder: str | Path) -> dict:
    """Volume node (oblique, anisotropic) -> NRRD -> SimpleITK (LPS) -> volume node.

    Geometry to 1e-6 mm, voxels equal.
    """
    folder = Path(folder)
    geometry = oblique_geometry()
    node, array = make_volume(scene, geometry=geometry)
    path = mrml_adapter.export_volume(node, folder / "round_trip.nrrd")

    image = sitk.ReadImage(str(path))
    flip = np.diag([-1.0, -1.0, 1.0])  # RAS -> LPS
    _assert_close(image.GetOrigin(), flip @ geometry.origin, "origin (LPS)")
    _assert_close(image.GetSpacing(), geometry.spacing, "spacing")
    _assert_close(np.array(image.GetDirection()).reshape(3, 3), flip @ geometry.directions, "direction (LPS)")
    # A physical point check, independent of how the matrices are stored: voxel (i,j,k) = (3,5,2).
    ras = geometry.origin + geometry.directions @ (geometry.spacing * np.array([3, 5, 2]))
    _assert_close(image.TransformIndexToPhysicalPoint((3, 5, 2)), flip @ ras, "voxel (3,5,2) position (LPS)")
    assert image.GetPixelID() == sitk.sitkInt16, f"pixel type changed to {image.GetPixelIDTypeAsString()}"
    assert np.array_equal(sitk.GetArrayFromImage(image), array), "voxel values changed on export"

    back = mrml_adapter.import_volume(path, scene, name="round trip")
    g2 = mrml_adapter.Geometry.of_node(back)
    _assert_close(g2.origin, geometry.origin, "origin after re-import (RAS)")
    _assert_close(g2.spacing, geometry.spacing, "spacing after re-import")
    _assert_close(g2.directions, geometry.directions, "directions after re-import (RAS)")
    assert np.array_equal(mrml_adapter.node_array(back), array), "voxel values changed on re-import"
    return {"path": path, "volume": node, "reimported": back}


def write_engine_output(folder: Path, labels: np.ndarray, geometry, classes: list[dict]) -> Path:
    """A label file + sidecar exactly as the engine's ``segment`` writes them."""
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    geometry.apply_to_image(image)
    path = Path(folder) / "engine_output.nrrd"
    sitk.WriteImage(image, str(path), True)
    mrml_adapter.sidecar_path(path).write_text(
        json.dumps({"classes": classes, "model": {"name": "test"}, "input": "x"})
    )
    return path


def label_import(scene, folder: str | Path, terminology: Terminology | None = None) -> dict:
    """Label file + sidecar -> segmentation node.

    Checks names, colours (0..255 -> 0..1), terminology, voxel counts and geometry.
    """
    terminology = terminology or Terminology.default()
    volume, _ = make_volume(scene, shape=(6, 16, 18))
    labels = np.zeros((6, 16, 18), np.uint8)
    labels[1:3, 2:6, 3:9] = 5  # liver: 2*4*6 = 48 voxels
    labels[4, 10:13, 10:12] = 1  # spleen: 6 voxels
    labels[5, 0, 0] = 9  # a value the sidecar does not name: kept as "Label 9"
    classes = [
        {"value": 1, "name": "spleen", "color": [157, 108, 162], "terminology": None},
        {"value": 2, "name": "right kidney", "color": [185, 102, 83], "terminology": None},
        {"value": 5, "name": "liver", "color": [221, 130, 101], "terminology": None},
    ]
    path = write_engine_output(Path(folder), labels, mrml_adapter.Geometry.of_node(volume), classes)
    study = put_in_study(scene, volume)
    node = mrml_adapter.import_segmentation(path, scene, volume, terminology=terminology)

    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["spleen", "right kidney", "liver", "Label 9"], f"segment names {names}"
    expected_counts = {"spleen": 6, "right kidney": 0, "liver": 48, "Label 9": 1}
    for name, count in expected_counts.items():
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        got = segment_voxel_count(node, segment_id, volume)
        assert got == count, f"segment {name}: {got} voxels, expected {count}"
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    _assert_close(liver.GetColor(), np.array([221, 130, 101]) / 255.0, "liver colour")
    if terminology is not None:
        liver_term = mrml_adapter.segment_terminology(liver)
        assert "10200004" in liver_term, f"liver terminology {liver_term!r}"
        kidney = mrml_adapter.segment_terminology(
            segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("right kidney"))
        )
        assert "64033007" in kidney and "24028007" in kidney, f"right kidney terminology {kidney!r}"
    # Reference geometry = the input volume; placed in the volume's study folder.
    reference = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
    assert reference is volume, "the segmentation's reference geometry is not the input volume"
    sh = slicer_sh(scene)
    parent = sh.GetItemParent(sh.GetItemByDataNode(node))
    assert parent == study, f"segmentation placed under item {parent}, not next to the volume (study item {study})"
    return {"segmentation": node, "volume": volume, "labels": labels, "study": study}


def paint_mask(segmentation_node, segment_id, volume_node, mask: np.ndarray) -> int:
    """Replace a segment's voxels with ``mask`` ([k, j, i] on the volume's grid), as the Segment Editor's
    paint would; returns the number of painted voxels."""
    import slicer
    import vtk

    holder = slicer.vtkMRMLLabelMapVolumeNode()
    mrml_adapter.set_node_array(
        holder, (np.asarray(mask) > 0).astype(np.uint8), mrml_adapter.Geometry.of_node(volume_node)
    )
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(holder.GetImageData())
    matrix = vtk.vtkMatrix4x4()
    holder.GetIJKToRASMatrix(matrix)
    oriented.SetGeometryFromImageToWorldMatrix(matrix)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        oriented, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )
    assert ok, "could not paint into the segment"
    return int(np.count_nonzero(mask))


def paint_slices(segmentation_node, segment_id, volume_node, slices_k, box=(slice(3, 7), slice(4, 9))) -> int:
    """Paint a rectangle on each K slice of ``slices_k`` into a segment."""
    mask = np.zeros(mrml_adapter.node_array(volume_node).shape, np.uint8)
    for k in slices_k:
        mask[k][box] = 1
    return paint_mask(segmentation_node, segment_id, volume_node, mask)


def labeled_slices(scene, folder: str | Path | None = None) -> dict:
    """Paint K slices 1, 4, 5 (liver) and 4 (spleen): the detected slices and the exported label file match."""
    volume, _ = make_volume(scene, shape=(7, 12, 14))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    liver = node.GetSegmentation().AddEmptySegment("", "liver", (0.8, 0.5, 0.4))
    spleen = node.GetSegmentation().AddEmptySegment("", "spleen", (0.6, 0.4, 0.6))
    unused = node.GetSegmentation().AddEmptySegment("", "aorta", (0.9, 0.4, 0.3))
    painted_liver = paint_slices(node, liver, volume, [1, 4, 5])
    painted_spleen = paint_slices(node, spleen, volume, [4], box=(slice(8, 10), slice(10, 12)))

    found = mrml_adapter.labeled_slices(node, [liver, spleen], volume)
    assert found.axis == 2, f"slice axis {found.axis}, expected K (2) for a near-axial volume"
    assert found.slices == [1, 4, 5], f"labeled slices {found.slices}"
    assert found.class_names == ["liver", "spleen"], f"class names {found.class_names}"
    assert found.voxel_counts == [painted_liver, painted_spleen], f"voxel counts {found.voxel_counts}"
    only_spleen = mrml_adapter.labeled_slices(node, [spleen], volume)
    assert only_spleen.slices == [4], f"spleen slices {only_spleen.slices}"

    result = {"segmentation": node, "volume": volume, "found": found, "segment_ids": [liver, spleen], "unused": unused}
    if folder is not None:
        written = mrml_adapter.export_training_labels(node, [liver, spleen], volume, Path(folder) / "train_labels.nrrd")
        image = sitk.ReadImage(str(written.path))
        array = sitk.GetArrayFromImage(image)
        assert int((array == 1).sum()) == painted_liver and int((array == 2).sum()) == painted_spleen, (
            "label file counts"
        )
        assert sorted(int(k) for k in np.flatnonzero(array.any(axis=(1, 2)))) == [1, 4, 5], "label file slices"
        geometry = mrml_adapter.Geometry.of_image(image)
        _assert_close(geometry.origin, mrml_adapter.Geometry.of_node(volume).origin, "label file origin")
        _assert_close(geometry.directions, mrml_adapter.Geometry.of_node(volume).directions, "label file directions")
        result["written"] = written
    return result


def tiny_segment_run(scene, engine: Engine | None = None, *, device: str = "cpu", timeout_s: float = 300) -> dict:
    """A real engine run (random tiny model) through SegmentJob: progress arrives, the result becomes
    a segmentation with the Synapse class names on the input volume's geometry, temp files are gone."""
    from .jobs import SegmentJob

    engine = engine or Engine.locate()
    volume, _ = make_volume(scene, shape=(3, 40, 48), name="tiny run volume")
    events = []
    job = SegmentJob(
        engine,
        scene,
        volume,
        TINY_TEST_ARGS + ("--classes", "synapse"),
        device=device,
        terminology=Terminology.default(),
        on_event=events.append,
    )
    job.start()
    outcome = job.wait(timeout_s)
    assert outcome.ok, (
        f"segment run ended {outcome.status}: {outcome.message}\n{outcome.run.stderr_tail if outcome.run else ''}"
    )
    progress = [e for e in events if e["event"] == "progress" and e["stage"] == "segment"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == 3, f"progress events {progress}"
    node = outcome.segmentation_node
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    expected = ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas"]
    assert names[: len(expected)] == expected, f"segment names {names}"
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume, "reference geometry"
    merged = mrml_adapter.merged_labels(node, [segmentation.GetNthSegmentID(i) for i in range(len(names))], volume)
    assert merged.shape == (3, 40, 48), f"result grid {merged.shape}"
    assert not job.workdir.exists(), f"temporary folder {job.workdir} was left behind"
    return {"segmentation": node, "volume": volume, "events": events, "job": job}


def tiny_cancel_run(scene, engine: Engine | None = None, *, timeout_s: float = 300) -> dict:
    """Cancel a real engine run after its first slice: status "cancelled", no segmentation node, no files left."""
    from .jobs import SegmentJob

    engine = engine or Engine.locate()
    volume, _ = make_volume(scene, shape=(40, 40, 48), name="cancel run volume")
    before = scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()
    events = []

    def on_event(event):
        events.append(event)
        if event["event"] == "progress" and event["stage"] == "segment" and event["done"] >= 1:
            job.cancel()

    job = SegmentJob(
        engine, scene, volume, TINY_TEST_ARGS + ("--classes", "synapse"), device="cpu", batch_size=1, on_event=on_event
    )
    job.start()
    outcome = job.wait(timeout_s)
    assert outcome.status == "cancelled", f"cancelled run ended {outcome.status}: {outcome.message}"
    done = [e["done"] for e in events if e["event"] == "progress" and e["stage"] == "segment"]
    assert done and max(done) < 40, f"the run was not stopped mid-way (slices done: {done[-3:]})"
    after = scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()
    assert after == before, f"a cancelled run added {after - before} segmentation node(s)"
    assert not job.workdir.exists(), f"temporary folder {job.workdir} was left behind"
    return {"job": job, "events": events}


def tiny_finetune_run(scene, folder: str | Path, engine: Engine | None = None, *, timeout_s: float = 300) -> dict:
    """Paint 2 segments on 3 slices, fine-tune the tiny model for 2 steps into a private library, then segment
    with the new adapter: the adapter has the painted classes, and the result has their segments."""
    from .jobs import FinetuneJob, SegmentJob

    base = engine or Engine.locate()
    engine = Engine(base.python, base.engine_dir, Path(folder) / "library")  # never the user's library
    volume, _ = make_volume(scene, shape=(6, 40, 48), name="finetune run volume")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted for fine-tuning")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    liver = node.GetSegmentation().AddEmptySegment("", "liver", (0.8, 0.5, 0.4))
    spleen = node.GetSegmentation().AddEmptySegment("", "spleen", (0.6, 0.4, 0.6))
    paint_slices(node, liver, volume, [1, 2, 4], box=(slice(5, 20), slice(6, 25)))
    paint_slices(node, spleen, volume, [2, 4], box=(slice(25, 35), slice(30, 40)))
    events = []
    job = FinetuneJob(
        engine,
        volume,
        node,
        [liver, spleen],
        "selftest_adapter",
        model_args=TINY_TEST_ARGS,
        steps=2,
        device="cpu",
        seed=0,
        on_event=events.append,
    )
    job.start()
    outcome = job.wait(timeout_s)
    assert outcome.ok, (
        f"fine-tune ended {outcome.status}: {outcome.message}\n{outcome.run.stderr_tail if outcome.run else ''}"
    )
    assert outcome.slices == [1, 2, 4], f"trained on slices {outcome.slices}"
    steps = [e["done"] for e in events if e["event"] == "progress" and e["stage"] == "finetune"]
    assert steps and steps[-1] == 2, f"fine-tune progress {steps}"
    assert not job.workdir.exists(), f"temporary folder {job.workdir} was left behind"
    entries = LibraryBridge(engine).list_adapters()
    assert [(e["name"], e["classes"]) for e in entries] == [("selftest_adapter", ["liver", "spleen"])], entries

    segment = SegmentJob(engine, scene, volume, ("--adapter", "selftest_adapter"), device="cpu")
    segment.start()
    result = segment.wait(timeout_s)
    assert result.ok, f"segment with the new adapter ended {result.status}: {result.message}"
    seg = result.segmentation_node.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert names == ["liver", "spleen"], f"segments of the new adapter's result {names}"
    return {"outcome": outcome, "segmentation": result.segmentation_node, "library": engine.library}


#: (title, scenario(scene, folder, engine), needs the engine): what HFSAMSegmentTest runs inside Slicer, in order.
SCENARIOS = (
    (
        "Volume node -> NRRD -> volume node: geometry to 1e-6 mm",
        lambda scene, folder, engine: geometry_round_trip(scene, folder),
        False,
    ),
    (
        "Engine label file + sidecar -> segmentation node next to the volume",
        lambda scene, folder, engine: label_import(scene, folder),
        False,
    ),
    (
        "Painted slices -> labeled slice indices and training label file",
        lambda scene, folder, engine: labeled_slices(scene, folder),
        False,
    ),
    (
        "Segment: a short engine run (random tiny model) through the background runner",
        lambda scene, folder, engine: tiny_segment_run(scene, engine),
        True,
    ),
    (
        "Cancel: a run stopped after its first slice leaves nothing behind",
        lambda scene, folder, engine: tiny_cancel_run(scene, engine),
        True,
    ),
    (
        "Fine-tune: 2 painted segments -> new adapter in a private library -> segment with it",
        lambda scene, folder, engine: tiny_finetune_run(scene, folder, engine),
        True,
    ),
)


def run_all(scene, logic, log=print) -> None:
    """Run SCENARIOS on ``scene`` (Slicer's), each on a cleared scene with its own folder under ``logic.temp_root``;
    the engine scenarios are skipped, with a message, while the engine's Python packages are missing."""
    import shutil
    import tempfile

    from . import installer

    missing = installer.missing_requirements()
    for title, scenario, needs_engine in SCENARIOS:
        if needs_engine and missing:
            log(f"Skipped ({title}): missing " + ", ".join(m.describe() for m in missing))
            continue
        log(title)
        scene.Clear(0)
        folder = tempfile.mkdtemp(prefix="hfsam-selftest-", dir=logic.temp_root)
        try:
            scenario(scene, folder, logic.engine)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    log("HF-SAM self-test passed")
