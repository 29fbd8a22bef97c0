"""PACS access: a private Orthanc for tests and demos, and the DICOMweb datastore the app serves from."""
