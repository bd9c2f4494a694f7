"""The scheduler's world: pure Python + CPU torch; never imports triton."""
