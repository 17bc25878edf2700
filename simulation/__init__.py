"""restwise.simulation: everything that runs many devices in one process - the simulation
runner (Flower's simulation engine), the fleet of generated persons and research cohorts, the
demo, the ``flwr run .`` simulation ServerApp, and the in-process federated evaluation. It may
import every other package; nothing else imports it."""
