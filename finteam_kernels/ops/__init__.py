"""One MoE op per module: its Triton launchers, its torch.library registration (with a fake
implementation and its backward) and the public function that checks arguments and picks a
backend. Kernels live in `*_kernels.py` and are imported on first use, so importing the package
neither needs Triton nor touches a GPU."""
