"""An analyzer made to order for the priority and worklist tests.

:class:`PlannedAnalyzer` scores each image with the probability and cascade stage planned
for its SOP Instance UID (the images themselves come from
:func:`tests.pipeline_support.chest_image`). Everything else — receive path, database,
pipeline, SR writer — is the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from inference.cascade import ImageResult
from tests.pipeline_support import FakeAnalyzer
from tests.results_data import make_finding, make_result

CONFIRM_THRESHOLD = 0.5  # the threshold make_finding reports


@dataclass
class PlannedAnalyzer(FakeAnalyzer):
    """Scores each image as planned: SOP Instance UID → (probability, stage).

    A confirm-stage finding is present at :data:`CONFIRM_THRESHOLD`; a screen-stage one
    never is (the confirm model did not run), as in the real cascade.
    """

    plan: dict[str, tuple[float, str]] = field(default_factory=dict)

    def _one(self, ds: Dataset) -> ImageResult:
        planned = self.plan.get(str(ds.SOPInstanceUID))
        if planned is None:
            return super()._one(ds)
        probability, stage = planned
        present = stage == "confirm" and probability >= CONFIRM_THRESHOLD
        finding = make_finding(present, stage, probability=probability)
        return make_result(ds, [finding])
