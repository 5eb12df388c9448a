"""Models: where base SDXL weights come from (hub id, folder, tiny, random-full), the one place that picks device
and dtype, and the builders of the small real-class models the tests run on. Imports no other room."""
