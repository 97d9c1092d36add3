"""What a batch leaves for people: each case's mask (NIfTI, DICOM SEG) and QC picture, the batch's
tables, its report and the summary an orchestrator shows.

- `masks`: the NIfTI mask and the DICOM SEG of one case;
- `qc`: the QC picture of one case (three planes and a montage, contours over the anatomy);
- `tables`: results.csv, quarantine.jsonl, JSON records;
- `report`: report.html, one self-contained page;
- `summary`: the batch in a few lines (counts, a bounded cases table, markdown) for a flow's UI.

Every writer is atomic. Import each module by its name; the package re-exports nothing.
"""
