"""The HF-SAM Segment module's logic, kept out of HFSAMSegment.py so CI can test it without Slicer.

- engine_command:  where the engine is, and the argv of every engine command
- process_runner:  the child process: progress JSON lines in, Cancel (process tree) out
- progress_parser: one stdout line -> event dict or None (never raises)
- mrml_adapter:    volume/segmentation nodes <-> engine files (the only MRML code)
- terminology:     class name -> SNOMED terminology entry (Resources/HFSAM.term.json)
- jobs:            Segment and Fine-tune: export, run, import, clean up
- library_bridge:  the model library through ``python -m HFSAMCore models ...``
- installer:       missing Python packages, the exact install command, install on request
- selftest:        scenarios shared by the pytest suite and Slicer's self-test

Nothing here imports Qt, and nothing is imported by this file, so importing one
piece (e.g. progress_parser in a test) does not pull in MRML or SimpleITK.
"""
