"""Running commands on a device: the plan interpreter, its lowering, and the runtime."""
