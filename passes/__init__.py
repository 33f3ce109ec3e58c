"""Graph-rewrite passes applied between trace and emit (``popc.export.ExportPlan.passes``).

Each pass is an ``onnx_ir.passes.InPlacePass`` (or a small set of onnxscript
rewrite rules wrapped in one): what it matches, what it puts instead, and when
it applies. Installed as ``popc.passes``.
"""
