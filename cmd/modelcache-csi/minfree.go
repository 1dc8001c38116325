package main

// defaultMinFree is --min-free's default. kubelet evicts pods once the node
// filesystem falls below kubeletNodefsAvailable free, or the image
// filesystem below kubeletImagefsAvailable free, and the cache often shares
// one of them. Keeping 20% free leaves a margin of five points above the
// higher of the two, so a full cache alone never puts the node into
// DiskPressure and never evicts unrelated pods.
const defaultMinFree = "20%"

// kubelet's default hard eviction thresholds (evictionHard in the kubelet
// configuration reference: nodefs.available<10%, imagefs.available<15%), as
// fractions of the filesystem kept available.
const (
	kubeletNodefsAvailable  = 0.10
	kubeletImagefsAvailable = 0.15
)
