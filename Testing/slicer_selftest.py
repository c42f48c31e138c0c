"""Run the HF-SAM Segment module's self-test inside a real 3D Slicer, then exit 0 (passed) or 1 (failed).

    Slicer --no-main-window --python-script Testing/slicer_selftest.py --additional-module-paths HFSAMSegment

HFSAMSegmentTest runs the scenarios of HFSAMSegmentLib/selftest.py (the ones the pytest suite
runs against slicer-core in CI) on Slicer's own scene: volume geometry round trip, engine output
-> segmentation node next to the volume, labeled-slice detection, and real engine runs of the
random tiny model through the background runner: Segment, Cancel (after the first slice: nothing
left behind) and Fine-tune (into a private model library, then Segment with the new adapter).
The engine runs are skipped, with a message, while the engine's Python packages are not installed
in Slicer. Works on Slicer 5.8 and later. Not collected by pytest: it needs Slicer's Python.
"""

import sys
import traceback
import unittest


def main() -> int:
    try:
        import HFSAMSegment  # needs Slicer's Python (slicer, qt) and the module folder on the path
    except ImportError as exc:
        print(
            f"slicer_selftest: run this inside Slicer with --additional-module-paths HFSAMSegment ({exc})",
            file=sys.stderr,
        )
        return 1
    suite = unittest.TestSuite([HFSAMSegment.HFSAMSegmentTest("runTest")])
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    try:
        status = main()
    except Exception:  # noqa: BLE001 - any crash is a failed self-test, never a hanging Slicer
        traceback.print_exc()
        status = 1
    print(f"HF-SAM self-test {'passed' if status == 0 else 'FAILED'}")
    try:
        import slicer

        slicer.util.exit(status)
    except ImportError:
        sys.exit(status)
