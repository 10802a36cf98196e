"""fedxray in the clinic: ``fl-predict`` scores radiographs with an exported ONNX model.

One idea per module: :mod:`clinic.predict` (files -> probabilities), :mod:`clinic.heatmap`
(where the evidence is), :mod:`clinic.sr` (the DICOM SR), :mod:`clinic.secondary_capture` (the
heatmap as a DICOM image), :mod:`clinic.outputs` (writing results), :mod:`clinic.serve` (the DIMSE
listener), :mod:`common.reference` and :mod:`clinic.drift` (input drift), :mod:`clinic.quantize`
(int8) and :mod:`clinic.cli` (the ``fl-predict`` command). The clinic is not part of the
federated app bundle: it never runs inside a Flower process. docs/clinic.md is the guide.
"""
