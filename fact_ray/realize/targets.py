"""The nvcc -gencode flags a family puts on its sources (Source.flags). 2.x kernels and plain CUDA build for A100
and also for Hopper (mma.sync runs there; the only 3xTF32 path on sm90); 3.x kernels need sm_90a: without the "a"
the WGMMA/TMA code compiles to an abort. A module of its own so that loading a kernel never imports the build."""

GENCODE = {"sm_80": "-gencode=arch=compute_80,code=sm_80", "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}
AMPERE_AND_HOPPER = (GENCODE["sm_80"], GENCODE["sm_90a"])
HOPPER_ONLY = (GENCODE["sm_90a"],)
