"""mlstm_platform: the control plane (CLI, manifest and chart rendering, job lifecycle, dashboards, planning)."""
