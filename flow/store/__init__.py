"""Run folders: one fitted detector on disk, written atomically and read back with checks."""
