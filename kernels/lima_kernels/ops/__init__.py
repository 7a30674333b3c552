"""The Triton ops, one file each: kernels, launchers, autograd, public function, module."""
