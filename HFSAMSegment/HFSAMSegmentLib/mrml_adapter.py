"""MRML nodes <-> files the engine reads and writes. The only Lib module that touches MRML.

Three jobs:

1. volume node -> NRRD file with the node's exact geometry (``export_volume``),
   and back (``import_volume``, used by tests and the self-test);
2. engine output (label file + sidecar JSON) -> segmentation node with named,
   coloured segments, terminology, reference geometry = the input volume,
   placed next to the volume in the subject hierarchy (``import_segmentation``);
3. segmentation + chosen segments -> label file on the volume's grid and the
   list of labeled slices, for fine-tuning (``labeled_slices``,
   ``export_training_labels``).

Geometry: MRML stores a volume as image data plus IJK-to-RAS (spacing, origin,
direction); ITK files are LPS. The two differ by a sign flip of the first two
world axes, nothing else, so no resampling ever happens here. Files are written
in the volume's *local* frame (parent transforms are not hardened); results are
put under the volume's parent transform, so they line up exactly in Slicer.

The scene is passed in (never ``slicer.mrmlScene``), so the same code runs in
Slicer and in CI against the real MRML classes of the ``slicer-core`` package.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtkmodules.util import numpy_support

from .errors import UserInputError
from .terminology import Terminology, terminology_for_class

# RAS (Slicer) <-> LPS (ITK, DICOM, NRRD "left-posterior-superior"): flip x and y.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# Colours for label values the sidecar does not name (0..1 RGB); Slicer's first
# "GenericAnatomyColors" entries, so unnamed segments look like Slicer's own.
FALLBACK_COLORS = [
    (0.50, 0.68, 0.50),
    (0.94, 0.84, 0.57),
    (0.69, 0.48, 0.40),
    (0.44, 0.72, 0.82),
    (0.85, 0.40, 0.31),
    (0.87, 0.51, 0.41),
    (0.56, 0.93, 0.56),
    (0.87, 0.74, 0.35),
]


# -- geometry -------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a volume in RAS: origin of voxel (0,0,0), spacing, direction columns."""

    origin: np.ndarray  # (3,) RAS mm
    spacing: np.ndarray  # (3,) mm
    directions: np.ndarray  # (3,3) RAS, column j = direction of index axis j

    @classmethod
    def of_node(cls, node) -> Geometry:
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASDirectionMatrix(m)
        directions = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
        origin = np.array(node.GetOrigin(), dtype=float)
        spacing = np.array(node.GetSpacing(), dtype=float)
        image = node.GetImageData()
        if image is not None:
            # Image data whose extent does not start at 0: voxel (0,0,0) of the
            # array lies at IJK = extent start, not at the node's origin.
            start = np.array(image.GetExtent()[0::2], dtype=float)
            origin = origin + directions @ (spacing * start)
        return cls(origin, spacing, directions)

    def apply_to_node(self, node) -> None:
        m = vtk.vtkMatrix4x4()
        for r in range(3):
            for c in range(3):
                m.SetElement(r, c, float(self.directions[r, c]))
        node.SetIJKToRASDirectionMatrix(m)
        node.SetSpacing(*map(float, self.spacing))
        node.SetOrigin(*map(float, self.origin))

    @classmethod
    def of_image(cls, image: sitk.Image) -> Geometry:
        directions_lps = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
        return cls(
            RAS_TO_LPS @ np.array(image.GetOrigin(), dtype=float),
            np.array(image.GetSpacing(), dtype=float),
            RAS_TO_LPS @ directions_lps,
        )

    def apply_to_image(self, image: sitk.Image) -> None:
        image.SetOrigin(tuple(map(float, RAS_TO_LPS @ self.origin)))
        image.SetSpacing(tuple(map(float, self.spacing)))
        image.SetDirection(tuple(map(float, (RAS_TO_LPS @ self.directions).ravel())))

    def slice_axis(self) -> int:
        """Index axis (0=I, 1=J, 2=K) closest to the patient S-I axis: the axis slices are counted along."""
        return int(np.argmax(np.abs(self.directions[2, :])))


# -- arrays <-> MRML image data --------------------------------------------------
def node_array(node) -> np.ndarray:
    """The voxels of a volume node as a numpy array [k, j, i] (a view; copy before changing)."""
    image = node.GetImageData() if node is not None else None
    name = node.GetName() if node is not None else "(none)"
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise UserInputError(f"volume '{name}' has no voxels; load or pick a volume that has image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise UserInputError(
            f"volume '{name}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "pick a grey-level (scalar) volume"
        )
    dims = image.GetDimensions()
    if min(dims) < 1:
        raise UserInputError(f"volume '{name}' is empty ({dims}); pick a volume that has image data")
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])


def set_node_array(node, array: np.ndarray, geometry: Geometry) -> None:
    """Give a volume node these voxels ([k, j, i]) and this geometry."""
    array = np.ascontiguousarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim != 3:
        raise UserInputError(f"expected a 3D image, got {array.ndim} dimensions; use a 3D volume")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(
        array.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(array.dtype)
    )
    image.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image)
    geometry.apply_to_node(node)


def volume_to_image(node) -> sitk.Image:
    """A SimpleITK image (LPS) with the node's voxels and geometry (local frame, parent transforms not applied)."""
    image = sitk.GetImageFromArray(node_array(node))  # copies
    Geometry.of_node(node).apply_to_image(image)
    return image


def image_to_array_and_geometry(image: sitk.Image) -> tuple[np.ndarray, Geometry]:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError(
            f"expected a 3D grey-level image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components; use a 3D scalar volume"
        )
    return sitk.GetArrayFromImage(image), Geometry.of_image(image)


# -- files -------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


def write_image(image: sitk.Image, path: str | Path, *, overwrite: bool = False, compress: bool = False) -> Path:
    """Write atomically: temp file in the same folder, fsync, rename. Never overwrites unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserInputError(f"{path} already exists; pick another file name or allow overwriting")
    if not path.parent.is_dir():
        raise UserInputError(f"folder {path.parent} does not exist; create it or pick another folder")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{_suffix(path)}")
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, compress)
        # "rb+", not "rb": on Windows fsync needs a handle with write access (EBADF otherwise).
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_volume(node, path: str | Path, *, overwrite: bool = False, compress: bool = False) -> Path:
    """Volume node -> image file (NRRD recommended: doubles keep the geometry exact)."""
    return write_image(volume_to_image(node), path, overwrite=overwrite, compress=compress)


def import_volume(path: str | Path, scene, *, name: str | None = None, labelmap: bool = False):
    """Image file -> new scalar (or labelmap) volume node in ``scene``, with the file's geometry."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path} does not exist; check the file name")
    array, geometry = image_to_array_and_geometry(sitk.ReadImage(str(path)))
    node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name or path.name.split(".")[0]))
    set_node_array(node, array, geometry)
    return node


# -- engine result -> segmentation node ------------------------------------------------
def sidecar_path(label_path: str | Path) -> Path:
    """The engine writes OUT.nrrd and OUT.json beside it (image extension replaced: seg.nii.gz -> seg.json)."""
    path = Path(label_path)
    for ext in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
        if path.name.lower().endswith(ext):
            return path.with_name(path.name[: -len(ext)] + ".json")
    return path.with_name(path.stem + ".json")


def read_sidecar(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read the result description {path}: {exc}; run the segmentation again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("classes", []), list):
        raise UserInputError(f"{path} has no 'classes' list; run the segmentation again with this version")
    return data


def _color01(color: Any, fallback: tuple[float, float, float]) -> tuple[float, float, float]:
    """Colours arrive as 0..255 ints (engine) or 0..1 floats; Slicer segments want 0..1."""
    try:
        rgb = [float(c) for c in color][:3]
    except (TypeError, ValueError):
        return fallback
    if len(rgb) != 3:
        return fallback
    if max(rgb) > 1.0:
        rgb = [c / 255.0 for c in rgb]
    return tuple(min(1.0, max(0.0, c)) for c in rgb)


def _class_table(classes: Iterable[dict], present: Iterable[int], terminology: Terminology | None) -> dict[int, dict]:
    """value -> {name, color, terminology} for every named class and every value present in the labels."""
    table: dict[int, dict] = {}
    for cls in classes:
        try:
            value = int(cls["value"])
        except (KeyError, TypeError, ValueError):
            continue
        if value <= 0:
            continue
        name = str(cls.get("name") or f"Label {value}")
        entry = terminology.lookup(name) if terminology else None
        fallback = entry.color if entry else FALLBACK_COLORS[(value - 1) % len(FALLBACK_COLORS)]
        table[value] = {
            "name": name,
            "color": _color01(cls.get("color"), fallback),
            "terminology": terminology_for_class(cls, terminology),
        }
    for value in present:
        if value > 0 and value not in table:
            table[value] = {
                "name": f"Label {value}",
                "color": FALLBACK_COLORS[(value - 1) % len(FALLBACK_COLORS)],
                "terminology": None,
            }
    return table


def import_segmentation(
    label_path: str | Path,
    scene,
    reference_volume,
    *,
    sidecar: str | Path | dict | None = None,
    segmentation_node=None,
    name: str | None = None,
    terminology: Terminology | None = None,
):
    """Engine output -> segmentation node (returned).

    - One segment per class of the sidecar (empty when the class was not found),
      named and coloured, with its terminology entry; label values the sidecar
      does not name become "Label N" segments, so nothing is lost.
    - ``segmentation_node=None`` makes a new node. Passing an existing node is
      the user's explicit choice to write into it: segments whose names match a
      class are replaced, all other segments are kept.
    - Reference geometry = ``reference_volume``; same parent transform; placed
      next to the volume in the subject hierarchy; visible in slice views.
    """
    label_path = Path(label_path)
    if not label_path.is_file():
        raise UserInputError(f"the engine did not write {label_path}; see the log for its error")
    if sidecar is None:
        sidecar = sidecar_path(label_path)
    info = (
        sidecar
        if isinstance(sidecar, dict)
        else (read_sidecar(sidecar) if Path(sidecar).is_file() else {"classes": []})
    )
    array, geometry = image_to_array_and_geometry(sitk.ReadImage(str(label_path)))
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise UserInputError(
                f"{label_path} is not a label map (it has fractional values); pick the engine's label output"
            )
        array = array.astype(np.int32)
    if array.min(initial=0) < 0:
        raise UserInputError(f"{label_path} has negative label values; pick the engine's label output")
    present = [int(v) for v in np.unique(array) if v > 0]
    table = _class_table(info.get("classes", []), present, terminology)

    if segmentation_node is not None:
        _fill_segmentation(scene, segmentation_node, reference_volume, table, array, geometry, new_node=False)
        return segmentation_node
    # A new node is added to the scene only complete: if anything fails, it is removed again,
    # so a failed import never leaves a half-filled segmentation behind.
    base = name or f"{reference_volume.GetName()} segmentation"
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(base))
    try:
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        segmentation_node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
        _fill_segmentation(scene, segmentation_node, reference_volume, table, array, geometry, new_node=True)
    except BaseException:
        display = segmentation_node.GetDisplayNode()
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(segmentation_node)
        raise
    return segmentation_node


def set_segment_terminology(segment, serialized: str) -> None:
    """Tag a segment with a terminology entry the way Slicer 5.8 reads it (``vtkSegment.SetTerminology`` is 5.10+)."""
    segment.SetTag(segment.GetTerminologyEntryTagName(), serialized)


def segment_terminology(segment) -> str:
    """A segment's serialized terminology entry, "" when it has none (works on Slicer 5.8 and later)."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(segment.GetTerminologyEntryTagName(), value) else ""


def _fill_segmentation(scene, segmentation_node, reference_volume, table, array, geometry, *, new_node: bool) -> None:
    segmentation = segmentation_node.GetSegmentation()

    segment_ids = vtk.vtkStringArray()  # index v-1 -> segment that receives label value v ("" = skip)
    max_value = max(table) if table else 0
    for value in range(1, max_value + 1):
        cls = table.get(value)
        if cls is None:
            segment_ids.InsertNextValue("")
            continue
        segment_id = "" if new_node else segmentation.GetSegmentIdBySegmentName(cls["name"])
        if not segment_id:
            segment_id = segmentation.AddEmptySegment("", cls["name"], cls["color"])
        segment = segmentation.GetSegment(segment_id)
        segment.SetColor(*cls["color"])
        if cls["terminology"]:
            set_segment_terminology(segment, cls["terminology"])
        segment_ids.InsertNextValue(segment_id)

    # The label file is in the volume's local frame, so the temporary labelmap
    # node sits under the volume's transform; Slicer then maps it into the
    # segmentation's frame whatever transform that one has.
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("HFSAM import"))
    try:
        set_node_array(labelmap, array, geometry)
        labelmap.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
        if max_value and not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap, segmentation_node, segment_ids
        ):
            raise UserInputError(
                f"Slicer could not import the labels into '{segmentation_node.GetName()}'; "
                "pick a segmentation whose source representation is binary labelmap, or a new one"
            )
    finally:
        scene.RemoveNode(labelmap)

    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        display.SetVisibility2D(True)
    place_next_to(scene, segmentation_node, reference_volume)


def place_next_to(scene, node, reference) -> None:
    """Put ``node`` under the same subject-hierarchy parent (patient/study folder) as ``reference``."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    reference_item = sh.GetItemByDataNode(reference)
    if not reference_item:
        return  # the volume is not in the hierarchy (bare scenes): nothing to be next to
    parent = sh.GetItemParent(reference_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


# -- segmentation -> training labels -----------------------------------------------------
@dataclass(frozen=True)
class TrainingLabels:
    """What ``finetune`` needs: the label file, the slices to learn from, and the class names in label order."""

    path: Path | None
    slices: list[int]
    class_names: list[str]
    axis: int  # IJK index axis the slices are counted along (2 = K for an axial CT)
    voxel_counts: list[int]  # per class, in label order


def segment_names(segmentation_node, segment_ids: Sequence[str]) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    names = []
    for segment_id in segment_ids:
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise UserInputError(
                f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'; pick the segments again"
            )
        names.append(segment.GetName())
    return names


def merged_labels(segmentation_node, segment_ids: Sequence[str], reference_volume) -> np.ndarray:
    """Chosen segments as one label array [k, j, i] on the reference volume's grid: segment n -> value n+1."""
    if segmentation_node is None:
        raise UserInputError("no segmentation selected; pick the segmentation that holds your labeled slices")
    if not segment_ids:
        raise UserInputError("no segments chosen; tick the segments the model should learn")
    segment_names(segmentation_node, segment_ids)  # checks every ID exists
    reference = node_array(reference_volume)
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    merged = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation_node, reference_volume, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged
    )
    out = np.zeros(reference.shape, dtype=np.uint8)
    scalars = merged.GetPointData().GetScalars() if merged.GetPointData() else None
    if scalars is None:
        return out  # nothing painted
    ext = merged.GetExtent()
    ref_ext = reference_volume.GetImageData().GetExtent()
    dims = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    values = numpy_support.vtk_to_numpy(scalars).reshape(dims)
    # Copy the overlap of the merged extent and the reference extent (both in the reference IJK frame).
    src, dst = [], []
    for axis_ijk in (2, 1, 0):  # numpy axes 0, 1, 2 are IJK's k, j, i
        lo = max(ext[2 * axis_ijk], ref_ext[2 * axis_ijk])
        hi = min(ext[2 * axis_ijk + 1], ref_ext[2 * axis_ijk + 1])
        if hi < lo:
            return out
        src.append(slice(lo - ext[2 * axis_ijk], hi - ext[2 * axis_ijk] + 1))
        dst.append(slice(lo - ref_ext[2 * axis_ijk], hi - ref_ext[2 * axis_ijk] + 1))
    out[tuple(dst)] = values[tuple(src)]
    return out


def slices_with_labels(labels: np.ndarray, axis_ijk: int) -> list[int]:
    """Indices along IJK axis ``axis_ijk`` of the slices that hold at least one labeled voxel."""
    axis_np = 2 - axis_ijk  # numpy arrays are [k, j, i]
    other = tuple(a for a in range(3) if a != axis_np)
    return [int(i) for i in np.flatnonzero(labels.any(axis=other))]


def labeled_slices(segmentation_node, segment_ids: Sequence[str], reference_volume) -> TrainingLabels:
    """Which slices of the volume hold labels of the chosen segments (nothing is written).

    The panel calls this after every pause in painting, in the GUI thread, so it
    reads each segment's own labelmap within its own extent (no resampling, no
    volume-sized array) whenever that labelmap lies on the volume's voxel grid,
    as it does for segments painted on this volume. Otherwise (another grid, a
    different parent transform, a closed-surface source) it resamples like
    ``merged_labels``. ``voxel_counts`` are per segment; voxels two segments
    share count for both.
    """
    if segmentation_node is None:
        raise UserInputError("no segmentation selected; pick the segmentation that holds your labeled slices")
    if not segment_ids:
        raise UserInputError("no segments chosen; tick the segments the model should learn")
    names = segment_names(segmentation_node, segment_ids)
    axis = Geometry.of_node(reference_volume).slice_axis()
    fast = _slices_on_the_volume_grid(segmentation_node, segment_ids, reference_volume, axis)
    if fast is not None:
        slices, counts = fast
        return TrainingLabels(None, slices, names, axis, counts)
    labels = merged_labels(segmentation_node, segment_ids, reference_volume)
    counts = [int(np.count_nonzero(labels == n + 1)) for n in range(len(segment_ids))]
    return TrainingLabels(None, slices_with_labels(labels, axis), names, axis, counts)


def _matrix(getter) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    getter(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _slices_on_the_volume_grid(segmentation_node, segment_ids, reference_volume, axis):
    """(slices, counts) from the segments' own labelmaps, or None when one of them is not on the volume's grid."""
    if segmentation_node.GetTransformNodeID() != reference_volume.GetTransformNodeID():
        return None
    reference = reference_volume.GetImageData()
    if reference is None:
        node_array(reference_volume)  # raises the "has no voxels" error
    ref_extent = np.array(reference.GetExtent()).reshape(3, 2)
    volume_from_ras = np.linalg.inv(_matrix(reference_volume.GetIJKToRASMatrix))
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation = segmentation_node.GetSegmentation()
    found: set[int] = set()
    counts = []
    for segment_id in segment_ids:
        segment = segmentation.GetSegment(segment_id)
        image = segment.GetRepresentation(labelmap_name)
        if image is None or not image.IsA("vtkOrientedImageData"):
            return None
        extent = np.array(image.GetExtent()).reshape(3, 2)
        scalars = image.GetPointData().GetScalars() if image.GetPointData() else None
        if scalars is None or np.any(extent[:, 1] < extent[:, 0]):
            counts.append(0)  # never painted
            continue
        # labelmap voxel index -> volume voxel index: must be the identity plus a whole-voxel shift.
        to_volume = volume_from_ras @ _matrix(image.GetImageToWorldMatrix)
        shift = np.round(to_volume[:3, 3])
        if not (
            np.allclose(to_volume[:3, :3], np.eye(3), atol=1e-4) and np.allclose(to_volume[:3, 3], shift, atol=1e-3)
        ):
            return None
        dims = extent[:, 1] - extent[:, 0] + 1
        values = numpy_support.vtk_to_numpy(scalars)
        if values.size != int(np.prod(dims)):
            return None
        mask = values.reshape(dims[2], dims[1], dims[0]) == segment.GetLabelValue()
        # Keep the part inside the volume (in volume IJK: labelmap index + shift).
        lo = np.maximum(extent[:, 0] + shift, ref_extent[:, 0]).astype(int)
        hi = np.minimum(extent[:, 1] + shift, ref_extent[:, 1]).astype(int)
        if np.any(hi < lo):
            counts.append(0)
            continue
        start = (lo - shift - extent[:, 0]).astype(int)
        stop = (hi - shift - extent[:, 0] + 1).astype(int)
        inside = mask[start[2] : stop[2], start[1] : stop[1], start[0] : stop[0]]  # numpy order is [k, j, i]
        counts.append(int(np.count_nonzero(inside)))
        axis_np = 2 - axis
        other = tuple(a for a in range(3) if a != axis_np)
        found.update(int(i) + int(lo[axis] - ref_extent[axis, 0]) for i in np.flatnonzero(inside.any(axis=other)))
    return sorted(found), counts


def export_training_labels(
    segmentation_node, segment_ids: Sequence[str], reference_volume, path: str | Path, *, overwrite: bool = False
) -> TrainingLabels:
    """Write the chosen segments as a label file on the volume's grid; return it with the labeled slices."""
    labels = merged_labels(segmentation_node, segment_ids, reference_volume)
    names = segment_names(segmentation_node, segment_ids)
    counts = [int(np.count_nonzero(labels == n + 1)) for n in range(len(segment_ids))]
    empty = [name for name, count in zip(names, counts) if count == 0]
    if empty:
        raise UserInputError(
            f"segment(s) {', '.join(repr(n) for n in empty)} have no painted voxels on this volume; "
            "paint them on a few slices or untick them"
        )
    image = sitk.GetImageFromArray(labels)
    Geometry.of_node(reference_volume).apply_to_image(image)
    axis = Geometry.of_node(reference_volume).slice_axis()
    written = write_image(image, path, overwrite=overwrite, compress=True)
    return TrainingLabels(written, slices_with_labels(labels, axis), names, axis, counts)
