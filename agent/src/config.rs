//! Agent configuration: kubelet-named flags, optionally a `--config` YAML file with the same
//! fields (a subset of KubeletConfiguration's names). Flags win over the file.
