//! Anomaly detection on results as they are stored (being written).
