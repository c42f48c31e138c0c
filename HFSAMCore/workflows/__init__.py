"""The product's jobs end to end, for the command line, the Slicer module and Python users alike."""
