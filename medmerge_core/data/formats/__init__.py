"""The papers' datasets and generic layouts, one module per family; see registry.load_task."""
