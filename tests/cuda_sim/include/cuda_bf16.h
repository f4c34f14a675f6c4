// cuda_sim stand-in for <cuda_bf16.h>: everything lives in cuda_sim.h.
#pragma once
#include "cuda_sim.h"
