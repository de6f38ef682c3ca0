"""Shared vocabulary: errors and exit codes, the manifest and file names, staged output directories, the cache."""
