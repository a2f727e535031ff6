"""Result writers: the DICOM objects the node sends back to PACS for one radiograph.

One module per IOD, each with one builder named after what it makes:

* :mod:`dicom_node.results.sr` — ``measurement_report``: Comprehensive 3D SR with a
  PS3.16 TID 1500 Measurement Report, one TID 1501 group per finding and per measured
  structure (heart, lungs);
* :mod:`dicom_node.results.heatmap_sc` — ``heatmap_secondary_capture``: the rendered
  Grad-CAM overlay as a Secondary Capture Image (PS3.3 A.8.1);
* :mod:`dicom_node.results.seg` — ``anatomy_segmentation``: heart and lung masks as a
  DICOM Segmentation (PS3.3 A.51; output type ``seg``, for adults whose anatomy was
  measured);
* :mod:`dicom_node.results.parametric_map` — the Grad-CAM map as a Parametric Map
  (output type ``pm``, off by default);
* :mod:`dicom_node.results.oru` — the study's HL7 ORU^R01 (a study event, not an output
  type);
* :mod:`dicom_node.results.uids` — deterministic output UIDs;
* :mod:`dicom_node.results.registry` — the output types a rule may name.

This package's ``__init__`` imports nothing, so that validating a configuration (which
checks a rule's output names against the registry) does not import highdicom.
:mod:`dicom_node.results.common` holds what every output shares: the equipment that
signs it (General Equipment module, PS3.3 C.7.5.1, and the TID 1004 device observer), the
node's private coding scheme, and the copy of the source's patient and study header that
puts the output into the source's study.
"""
