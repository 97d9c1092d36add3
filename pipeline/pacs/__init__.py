"""PACS in and out: pull studies over DICOMweb (QIDO-RS + WADO-RS) or DIMSE (C-FIND + C-MOVE) into a
spool folder that then goes through the ordinary folder ingest, push DICOM SEG results back over
STOW-RS or C-STORE, and a C-STORE listener for sites that send studies.

Modules: `url` (the SOURCE / destination URLs and relative dates), `common` (credentials, errors),
`spool` (the resumable on-disk spool), `dicomweb` and `dimse` (the two protocols), `pull` (a URL
source to a folder), `push` and `record` (pushing results, the per-case push record), `listener`.
"""
