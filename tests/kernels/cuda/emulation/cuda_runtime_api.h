// Stand-in for the CUDA runtime header in the emulation build (simt_emulator.h,
// fake_cuda_runtime.h).
#include "fake_cuda_runtime.h"
