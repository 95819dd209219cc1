"""The autoscaler on Kubernetes: the PodAutoscaler reconciler for our class (pure step in
`podautoscaler.py`, the controller around it in `pa_controller.py`)."""
