"""3D boxes from network outputs, and how two sets of boxes agree."""
