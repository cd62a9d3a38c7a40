// Stand-in for the CUDA runtime header in the SIMT emulation build (simt_emulator.h).
#include "simt_emulator.h"
