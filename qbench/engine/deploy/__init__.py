"""Real integer inference of a qbench-quantized model (``qbench deploy-check``, issue 17).

:mod:`~qbench.engine.deploy.plan` reads, from a quantized :class:`~qbench.vlm.VLM`, exactly the integers, scales
and zero points its fake quantizers apply, and says which layers an integer engine can run and why not the others.
The engines (torchao, ONNX Runtime) build their models from that plan only: nothing is calibrated again.
"""
