"""Data files of the data package (EgoIT instruction templates)."""
