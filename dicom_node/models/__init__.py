"""Models in the field: the registry of installed versions and what is in force, shadow
runs, readers' feedback, live performance, drift and site recalibration.

One concept per module: :mod:`.registry` (install, activate, rollback, shadow),
:mod:`.following` (the worker's analyzer that follows the registry without a restart),
:mod:`.scores` (what each model version answered, per image), :mod:`.feedback` (labels),
:mod:`.performance` and :mod:`.compare` (against the labels and each other),
:mod:`.drift` (inputs and outputs against the bundle's reference) and
:mod:`.calibrate` (a site-derived version).
"""
