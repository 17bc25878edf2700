"""restwise.simulation: everything that runs many devices in one process (in-process
federated evaluation rows, simulation runner, fleet, demo). May import any Restwise package."""
