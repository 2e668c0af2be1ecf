"""What runs the loop: the backend decision, compiled and TensorRT engines, export, Purifier."""
