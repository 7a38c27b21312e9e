"""Readers at the edge: a user's point clouds, camera frames and nuScenes-layout datasets.

Everything a deployed model sees from outside deploykit comes through here, and
each reader checks the input contract of the recipe it feeds (what each point
column is, its range, the camera image size) and says what it expected when
the data does not fit. The core of deploykit never needs nuscenes-devkit.
"""
