"""End-to-end tests against real peers (Orthanc, dcmtk) on free loopback ports."""
