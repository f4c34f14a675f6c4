// cuda_sim stand-in for <cuda_runtime.h>: everything lives in cuda_sim.h.
#pragma once
#include "cuda_sim.h"
