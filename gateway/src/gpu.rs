//! GPU utilisation and memory through NVML (`libnvidia-ml.so.1`, part of the NVIDIA driver).
//!
//! NVML is loaded at start when the driver is installed; without it, or with no GPU, there
//! is no monitor and the GPU metrics are absent, never zero.

/// One GPU's state at the moment it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSample {
    /// NVML's device index (the label `gpu`).
    pub index: u32,
    /// Percent of the last sample period in which a kernel ran, 0 to 100.
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

/// Reads every GPU of the machine through NVML.
pub struct GpuMonitor {
    nvml: nvml_wrapper::Nvml,
    count: u32,
}

impl std::fmt::Debug for GpuMonitor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GpuMonitor")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl GpuMonitor {
    /// A monitor when NVML loads and sees at least one GPU; `None` otherwise.
    pub fn probe() -> Option<Self> {
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(nvml) => nvml,
            Err(error) => {
                tracing::debug!(%error, "NVML not available: no GPU metrics");
                return None;
            }
        };
        let count = nvml.device_count().ok().filter(|count| *count > 0)?;
        let names: Vec<String> = (0..count)
            .filter_map(|index| nvml.device_by_index(index).ok()?.name().ok())
            .collect();
        tracing::info!(gpus = ?names, "GPU metrics through NVML");
        Some(GpuMonitor { nvml, count })
    }

    /// The GPUs that answered; one that fails to answer is left out rather than reported
    /// as idle.
    pub fn sample(&self) -> Vec<GpuSample> {
        (0..self.count)
            .filter_map(|index| {
                let device = self.nvml.device_by_index(index).ok()?;
                let utilization = device.utilization_rates().ok()?;
                let memory = device.memory_info().ok()?;
                Some(GpuSample {
                    index,
                    utilization_percent: utilization.gpu,
                    memory_used_bytes: memory.used,
                    memory_total_bytes: memory.total,
                })
            })
            .collect()
    }
}
