"""Kernel providers: who computes each heavy op of an x86 artifact.

TVM's untuned kernels run convolutions and matmuls 50-80x slower than
onnxruntime, and MetaSchedule needs tens of minutes per model to close most of
that gap. So the heavy op chains (conv2d / matmul / batched matmul with their
bias, residual add and activation) have candidate implementations, and optc
measures them per workload on this machine and keeps the fastest
(:mod:`.select`, choices cached in the tuning database folder):

* TVM's own kernel, compiled as the rest of the model is (tuning records when
  the database has them, default schedules otherwise);
* oneDNN (:mod:`.onednn`), called through ``relax.call_dps_packed`` from C++
  glue linked into ``model.so`` (:file:`onednn_glue.cc`).

:mod:`.chains` finds the chains, :mod:`.offload` rewrites the chosen ones.
Models with convolutions are converted to NHWC first, the layout oneDNN's
convolutions read in place, so no reorder sits between two of them
(:mod:`.layout_ops`). What is left to TVM then has its quantizes multiply by
the reciprocal scale (:mod:`.reciprocal_scale`) and a quantize read back at once
keep its value without the 8-bit round trip (:mod:`.requant_round_trip`).
"""
