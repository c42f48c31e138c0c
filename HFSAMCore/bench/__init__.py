"""`hfsam bench`: speed, memory and few-shot quality, measured the same way on every machine."""
