"""Volumes in and out: what a file is, its integrity, reading (files and DICOM), geometry, writing.

The data path starts here: ``formats`` and ``data_size`` check a file before ITK reads it,
``read`` and ``dicom`` read it into a SimpleITK image with its geometry, ``geometry`` matches
label maps to images by physical position, ``slices`` turns a volume into model-ready slices,
``write`` and ``atomic`` write results atomically, ``outputs`` claims what a run will write.
"""
