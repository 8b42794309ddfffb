"""Tissue microarrays in: slide reading, dearraying, ingestion with QC, patient-level splits."""
