#include "../damped_inverse_impl.h"
TORCH_LIBRARY_IMPL(ziplm, CPU, m) { m.impl("damped_inverse", &ziplm::damped_inverse_impl); }
