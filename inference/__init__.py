"""The clinical core: a radiograph in, calibrated findings and a heatmap out.

Pure: no network, no database, nothing from ``dicom_node`` or ``storage``. The pipeline,
one module per step::

    decode.py      DICOM pixels → display image (Modality LUT, VOI, MONOCHROME1)
    preprocess.py  the one MONAI transform chain (training and serving)
    gate.py        header rules, feature distance, pixel polarity
    networks/      MobileNetV3 (screen) and MONAI ResNet-18 (confirm)
    cascade.py     screen → confirm for a batch: ``Cascade.load().analyze(datasets)``
    explain.py     Grad-CAM and the rendered overlay
    bundle.py      MONAI-layout model bundles, verified by sha256 at load
    datasets.py    labelled image folders (``labels.csv``) for training and evaluation
    train.py       ``python -m inference.train --data …/kermany-train --adults …/nih-sample``
    evaluate.py    metrics, calibration; ``python -m inference.evaluate --data FOLDER``

``train`` imports ``evaluate`` (metrics, calibration), never the other way round; both read
labelled folders through ``datasets``.
"""
