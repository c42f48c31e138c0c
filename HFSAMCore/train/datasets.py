"""Readers for the datasets of the literature, and the few-shot draws made from them.

Three layouts, as the community distributes them (the project ships none of the data):

``synapse``  TransUNet's preprocessing, used by SAMed, H-SAM and HF-SAM.
             Training: ``train_npz/caseXXXX_sliceYYY.npz`` with arrays ``image``
             [H,W] (CT already clipped to [-125, 275] HU and scaled to [0, 1]) and
             ``label`` [H,W] (0..8). Test: ``test_vol_h5/caseXXXX.npy.h5`` with
             ``image`` and ``label`` [D,H,W]. Lists: ``train.txt`` (slice names),
             ``test_vol.txt`` (case names).
``acdc``     SSL4MIS / BCP preprocessing. ``data/slices/patientXXX_frameYY_slice_Z.h5``
             and ``data/patientXXX_frameYY.h5`` with ``image`` (min-max normalised
             to [0, 1] per volume) and ``label`` (1 RV, 2 Myo, 3 LV). Lists:
             ``train_slices.list`` (slice names), ``train.list``, ``val.list``,
             ``test.list`` (volume names).
``nifti``    nnU-Net style folders: ``imagesTr/CASE_0000.nii.gz`` (or ``CASE.nii.gz``)
             with ``labelsTr/CASE.nii.gz``; ``imagesTs``/``labelsTs`` for testing.
             Raw intensities: they go through the engine's own slicing and intensity
             presets (``io/slices.py``), exactly as ``hfsam finetune``/``segment`` do,
             so an adapter trained here works on any CT/MR file.

The preprocessed formats are already normalised: they are NOT re-windowed here
(windowing [0, 1] data as HU would flatten it to black). Values are only
clipped to [0, 1].

Every reader answers the same questions: which slices (names, in list
order; each slice belongs to a patient), which of some named slices it does
not hold (``missing_slices``, checked before a run starts) and which volumes
(for evaluation).
Readers are plain picklable objects, so DataLoader worker processes can use
them; h5py is imported only by the readers that need it.

Few-shot draws (``sample_fraction``, ``sample_patients``) follow the
literature: H-SAM's ``random.sample`` of a fraction of the slice list with a
fixed seed; SSL4MIS's "first K patients of the list" (ACDC 3 patients = 68
slices, 7 = 136).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .dataset_lists import read_list

DATASETS = ("synapse", "acdc", "nifti")


#: ACDC's default list files, inside --root as SSL4MIS keeps them. (TransUNet keeps Synapse's
#: train.txt / test_vol.txt in its code repository: without --list, every file in --root is used.)
ACDC_TRAIN_LIST, ACDC_TEST_LIST = "train_slices.list", "test.list"


_RANGE_TOLERANCE = 0.01  # float noise around [0, 1] in preprocessed files


@dataclass
class Volume:
    """One evaluation case: image in [0,1] and labels, both [D,H,W] with D the slice axis.

    ``spacing_zyx`` (mm, same axis order) when known; None for the preprocessed
    .h5 volumes, which do not record it. ``reference`` is the original image for
    NIfTI cases (to write predictions with their geometry), else None.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing_zyx: tuple[float, float, float] | None = None
    reference: object | None = None  # sitk.Image
    view: object | None = None  # slices.SliceView that made the stack from `reference`


def _as_unit_image(image: np.ndarray, where: str, what: str) -> np.ndarray:
    """float32 in [0, 1]; refuse data that is clearly not preprocessed (e.g. raw HU)."""
    image = np.asarray(image)
    if image.dtype.kind not in "fiu":
        raise InputError(f"{where}: '{what}' has dtype {image.dtype}, not numbers")
    image = image.astype(np.float32, copy=False)
    if image.size and not np.isfinite(image).all():
        raise InputError(f"{where}: the image contains NaN or infinite values")
    lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise InputError(
            f"{where}: image values span {lo:.4g}..{hi:.4g}, but this format must already be "
            "scaled to [0, 1]; use the preprocessed release or --dataset nifti for raw volumes"
        )
    return np.clip(image, 0.0, 1.0)


def _as_labels(label: np.ndarray, where: str) -> np.ndarray:
    """int64 labels; the preprocessed files often store them as floats (0.0, 1.0, ...)."""
    label = np.asarray(label)
    if label.dtype.kind == "f":
        rounded = np.rint(label)
        if label.size and np.abs(label - rounded).max() > 1e-3:
            raise InputError(f"{where}: the label array holds non-integer values; it is not a label map")
        label = rounded
    elif label.dtype.kind not in "iub":
        raise InputError(f"{where}: '{label.dtype}' is not a label type")
    label = label.astype(np.int64)
    if label.size and label.min() < 0:
        raise InputError(f"{where}: the label map has negative values")
    return label


def _check_pair(image: np.ndarray, label: np.ndarray, where: str, ndim: int) -> None:
    if image.ndim != ndim or label.shape != image.shape:
        raise InputError(
            f"{where}: expected image and label of the same {ndim}D shape, got {image.shape} and {label.shape}"
        )


def _read_h5(path: Path, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    import h5py  # only the .h5 formats need it

    if not path.is_file():
        raise InputError(f"{path} does not exist; check --root and the list file")
    try:
        with h5py.File(path, "r") as fh:
            missing = [k for k in ("image", "label") if k not in fh]
            if missing:
                raise InputError(f"{path}: no '{missing[0]}' dataset; expected 'image' and 'label'")
            image, label = fh["image"][()], fh["label"][()]
    except OSError as exc:
        raise InputError(f"{path} is not a readable HDF5 file ({str(exc).splitlines()[0]})") from None
    image, label = _as_unit_image(image, str(path), "image"), _as_labels(label, str(path))
    _check_pair(image, label, str(path), ndim)
    return image, label


def _folder(root: Path, what: str) -> Path:
    if not root.is_dir():
        raise InputError(f"{what} {root} is not a folder; check --root")
    return root


class SynapseData:
    """TransUNet's Synapse release. ``root`` is ``train_npz`` (training) or ``test_vol_h5`` (evaluation)."""

    kind = "synapse"
    intensity_preset = "ct"

    def __init__(self, root: str | Path):
        self.root = _folder(Path(root).expanduser(), "the Synapse folder")

    def slice_names(self, list_file: str | Path | None = None) -> list[str]:
        if list_file is not None:
            return read_list(list_file)
        names = sorted(p.name[: -len(".npz")] for p in self.root.glob("*.npz"))
        if not names:
            raise InputError(f"no .npz slices in {self.root}; --root must be TransUNet's train_npz folder")
        return names

    @staticmethod
    def patient_of(name: str) -> str:
        return name.split("_slice")[0]

    def missing_slices(self, names: list[str]) -> list[str]:
        return [n for n in names if not (self.root / f"{n}.npz").is_file()]

    def load_slice(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.root / f"{name}.npz"
        if not path.is_file():
            raise InputError(f"{path} does not exist; the list names a slice that is not in --root")
        try:
            with np.load(path, allow_pickle=False) as data:  # never unpickle
                missing = [k for k in ("image", "label") if k not in data.files]
                if missing:
                    raise InputError(f"{path}: no '{missing[0]}' array; expected 'image' and 'label'")
                image, label = data["image"], data["label"]
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not a readable .npz file ({str(exc).splitlines()[0]})") from None
        image, label = _as_unit_image(image, str(path), "image"), _as_labels(label, str(path))
        _check_pair(image, label, str(path), 2)
        return image, label

    def volume_names(self, list_file: str | Path | None = None) -> list[str]:
        if list_file is not None:
            return read_list(list_file)
        names = sorted(p.name[: -len(".npy.h5")] for p in self.root.glob("*.npy.h5"))
        if not names:
            raise InputError(f"no .npy.h5 volumes in {self.root}; --root must be TransUNet's test_vol_h5 folder")
        return names

    def load_volume(self, name: str) -> Volume:
        image, label = _read_h5(self.root / f"{name}.npy.h5", 3)
        return Volume(name, image, label)


class AcdcData:
    """SSL4MIS's ACDC release. ``root`` holds ``data/`` and the ``*.list`` files."""

    kind = "acdc"
    intensity_preset = "mr"

    def __init__(self, root: str | Path):
        self.root = _folder(Path(root).expanduser(), "the ACDC folder")

    def slice_names(self, list_file: str | Path | None = None) -> list[str]:
        if list_file is None:
            list_file = self.root / ACDC_TRAIN_LIST
        return read_list(list_file)

    @staticmethod
    def patient_of(name: str) -> str:
        return name.split("_")[0]

    def missing_slices(self, names: list[str]) -> list[str]:
        return [n for n in names if not (self.root / "data" / "slices" / f"{n}.h5").is_file()]

    def load_slice(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return _read_h5(self.root / "data" / "slices" / f"{name}.h5", 2)

    def volume_names(self, list_file: str | Path | None = None) -> list[str]:
        if list_file is None:
            list_file = self.root / ACDC_TEST_LIST
        return read_list(list_file)

    def load_volume(self, name: str) -> Volume:
        image, label = _read_h5(self.root / "data" / f"{name}.h5", 3)
        return Volume(name, image, label)


_SLICE_NAME = re.compile(r"^(?P<case>.+)_slice(?P<index>[0-9]+)$")


class NiftiData:
    """nnU-Net style ``imagesTr``/``labelsTr`` (``subset="Tr"``) or ``imagesTs``/``labelsTs`` (``"Ts"``).

    Slices are the engine's canonical slices along ``axis`` (slices.SliceView),
    named ``CASE_sliceNNN``; intensities go through the preset (``"auto"``
    decides once, from the first case, so that every case is scaled alike).
    Reading a compressed NIfTI costs the whole volume, so training slices are
    extracted once per case by ``preload`` and kept in memory (float32 + labels):
    draw a fraction or K patients, or use the preprocessed formats, for very
    large datasets.
    """

    kind = "nifti"

    def __init__(self, root: str | Path, *, subset: str = "Tr", axis: str = "axial", preset: str = "auto"):
        self.root = _folder(Path(root).expanduser(), "the NIfTI dataset folder")
        if subset not in ("Tr", "Ts"):
            raise InputError(f"the NIfTI subset must be Tr or Ts, not {subset!r}")
        self.subset, self.axis = subset, axis
        self.images_dir = _folder(self.root / f"images{subset}", "the images folder")
        self.labels_dir = _folder(self.root / f"labels{subset}", "the labels folder")
        self._preset = preset
        self._store: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- cases -----------------------------------------------------------------
    def cases(self) -> list[str]:
        names = sorted(p.name[: -len(".nii.gz")] for p in self.labels_dir.glob("*.nii.gz"))
        names += sorted(p.name[: -len(".nii")] for p in self.labels_dir.glob("*.nii"))
        if not names:
            raise InputError(f"no .nii.gz label maps in {self.labels_dir}")
        return names

    def image_path(self, case: str) -> Path:
        for candidate in (f"{case}_0000.nii.gz", f"{case}.nii.gz", f"{case}_0000.nii", f"{case}.nii"):
            path = self.images_dir / candidate
            if path.is_file():
                return path
        raise InputError(f"no image for case {case} in {self.images_dir} (expected {case}_0000.nii.gz)")

    def label_path(self, case: str) -> Path:
        for candidate in (f"{case}.nii.gz", f"{case}.nii"):
            path = self.labels_dir / candidate
            if path.is_file():
                return path
        raise InputError(f"no label map for case {case} in {self.labels_dir}")

    @property
    def intensity_preset(self) -> str:
        if self._preset == "auto":
            from ..io.read import read_image
            from ..io.slices import choose_preset

            self._preset = choose_preset(read_image(self.image_path(self.cases()[0])))
        return self._preset

    def _stacks(self, case: str):
        """(normalised canonical image stack, canonical label stack, view, image) of one case."""
        import SimpleITK as sitk

        from ..io.geometry import labels_onto_image
        from ..io.read import read_image, read_labels
        from ..io.slices import SliceView, normalize, volume_stats

        image = read_image(self.image_path(case))
        labels = labels_onto_image(read_labels(self.label_path(case)), image)
        view = SliceView.from_image(image, self.axis)
        array = sitk.GetArrayViewFromImage(image)
        preset = self.intensity_preset
        stack = normalize(view.to_slices(array), preset, stats=volume_stats(array, preset))
        lab = np.asarray(view.to_slices(sitk.GetArrayViewFromImage(labels)), dtype=np.int64)
        return stack, lab, view, image

    # -- slices ------------------------------------------------------------------
    def slice_names(self, list_file: str | Path | None = None) -> list[str]:
        """Every canonical slice of the listed cases (default: all cases), from the headers only."""
        cases = read_list(list_file) if list_file is not None else self.cases()
        return [f"{case}_slice{k:03d}" for case in cases for k in range(self.n_slices(case))]

    def n_slices(self, case: str) -> int:
        """Canonical slices of a case along the axis, from the image header only."""
        import SimpleITK as sitk

        from ..io.slices import SliceView

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(self.image_path(case)))
        reader.ReadImageInformation()
        if reader.GetDimension() != 3:
            raise InputError(f"{self.image_path(case)} is not a 3D volume")
        return SliceView.from_image(reader, self.axis).n_slices  # duck-typed: the reader has the geometry

    def missing_slices(self, names: list[str]) -> list[str]:
        """Names that are no CASE_sliceNNN of a case here (image and label map) within its slices."""
        counts: dict[str, int] = {}
        missing = []
        for name in names:
            match = _SLICE_NAME.match(name)
            if not match:
                missing.append(name)
                continue
            case = match["case"]
            if case not in counts:
                try:
                    self.label_path(case)
                    counts[case] = self.n_slices(case)
                except InputError:
                    counts[case] = 0
            if int(match["index"]) >= counts[case]:
                missing.append(name)
        return missing

    @staticmethod
    def patient_of(name: str) -> str:
        match = _SLICE_NAME.match(name)
        if not match:
            raise InputError(f"{name!r} is not a NIfTI slice name (CASE_sliceNNN)")
        return match["case"]

    def preload(self, names: list[str]) -> None:
        """Read each case once and keep only the named slices (see the class docstring)."""
        wanted: dict[str, list[int]] = {}
        for name in names:
            if name not in self._store:
                case = self.patient_of(name)  # refuses a name that is no CASE_sliceNNN
                match = _SLICE_NAME.match(name)
                assert match is not None
                wanted.setdefault(case, []).append(int(match["index"]))
        for case, indices in wanted.items():
            stack, lab, _, _ = self._stacks(case)
            for k in indices:
                if not 0 <= k < len(stack):
                    raise InputError(f"slice {case}_slice{k:03d} is outside {case} ({len(stack)} slices)")
                self._store[f"{case}_slice{k:03d}"] = (np.ascontiguousarray(stack[k]), np.ascontiguousarray(lab[k]))

    def load_slice(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._store:
            self.preload([name])
        return self._store[name]

    # -- volumes -----------------------------------------------------------------
    def volume_names(self, list_file: str | Path | None = None) -> list[str]:
        return read_list(list_file) if list_file is not None else self.cases()

    def load_volume(self, name: str) -> Volume:
        stack, lab, view, image = self._stacks(name)
        rows, cols = view.slice_spacing_mm
        return Volume(name, stack, lab, (view.slice_thickness_mm, rows, cols), image, view)


def open_dataset(kind: str, root: str | Path, **nifti_options):
    """The reader for ``kind`` (synapse, acdc, nifti) over ``root``."""
    if kind == "synapse":
        return SynapseData(root)
    if kind == "acdc":
        return AcdcData(root)
    if kind == "nifti":
        return NiftiData(root, **nifti_options)
    raise InputError(f"--dataset must be one of {', '.join(DATASETS)}, not {kind!r}")
