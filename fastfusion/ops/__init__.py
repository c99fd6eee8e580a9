"""One file per op family: the plain-PyTorch reference, its explicit backward, the
``fastfusion::`` custom op with its fake kernel and autograd, and the public function."""
