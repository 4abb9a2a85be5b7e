"""Reading, checking and preparing data: file readers and row formats, de-duplication, splits, contamination."""
