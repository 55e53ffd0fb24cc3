"""What a deployer copies next to an artifact: runners that need only TVM's runtime.

- ``run_artifact.py``: the Python runner (numpy and TVM only; optc imports its checks from it, so
  ``optc run`` and the deployed runner refuse the same things in the same words);
- ``runner.cc``: the C++ runner, one source for x86-64 and aarch64;
- ``build_runner.py``: builds ``runner.cc`` against the installed TVM wheels.
"""
