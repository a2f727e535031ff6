"""What the listener accepts at association negotiation: SOP classes and transfer syntaxes.

Only image storage classes a chest radiograph actually arrives as are accepted (PS3.4
Annex B.5): CR, DX (for presentation and for processing) and Secondary Capture, the
latter including the multi-frame grayscale variants used by film digitisers and
converters. Everything else (CT, SR, …) is refused per presentation context, so a
misrouted study fails loudly at the sender instead of piling up here.

Transfer syntaxes are listed in our order of preference, which pynetdicom applies when a
sender proposes several in one presentation context: uncompressed and lossless first,
lossy last — we never ask a sender to compress an image lossily for us.
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)

UNCOMPRESSED_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,  # retired, but still sent by some older modalities
)
LOSSLESS_SYNTAXES: tuple[UID, ...] = (
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
)
LOSSY_SYNTAXES: tuple[UID, ...] = (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
)
STORAGE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    UNCOMPRESSED_SYNTAXES[:2] + LOSSLESS_SYNTAXES + UNCOMPRESSED_SYNTAXES[2:] + LOSSY_SYNTAXES
)
VERIFICATION_SYNTAXES: tuple[UID, ...] = UNCOMPRESSED_SYNTAXES

VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")  # Verification SOP Class
