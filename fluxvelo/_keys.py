"""Names of the AnnData keys fluxvelo reads and writes, defined once."""

MS = "Ms"  # layers: kNN-smoothed spliced abundance
MU = "Mu"  # layers: kNN-smoothed unspliced abundance
SPLICED = "spliced"
UNSPLICED = "unspliced"

VELOCITY = "velocity"  # layers: ds/dt; also the default key_added
VELOCITY_U = "{key}_u"  # layers: du/dt
DRIVE = "{key}_drive"  # layers: transcription drive per cell and gene
VELOCITY_GENES = "{key}_genes"  # var: genes whose velocity is used downstream
PARAMS = "{key}_params"  # uns: settings, version, device, loss history
GRAPH = "{key}_graph"  # uns: positive cosine transition graph
GRAPH_NEG = "{key}_graph_neg"  # uns: negative part
EMBEDDING = "{key}_{basis}"  # obsm: velocity projected into basis

# var columns of the fitted kinetic field (scVelo-like 'fit_' names)
FIT_ALPHA_U = "fit_drive_a"  # drive coefficient on u
FIT_ALPHA_S = "fit_drive_b"  # drive coefficient on s
FIT_ALPHA_0 = "fit_drive_c"  # drive offset
FIT_BETA = "fit_beta"  # splicing rate
FIT_GAMMA = "fit_gamma"  # degradation rate
FIT_SCALE_U = "fit_scaling_u"  # per-gene scale applied to u before the fit
FIT_SCALE_S = "fit_scaling_s"  # per-gene scale applied to s before the fit
FIT_LOSS = "fit_loss"  # per-gene training loss over the last epoch's worth of steps
FIT_STATIONARITY = "fit_stationarity"  # per-gene |E[f] + Cov(x, g)| / E|f|: 0 = the fit reaches its balance
FIT_TIME_SCALE = "fit_time_scale"  # per-gene factor from the fit's time to the time unit the velocities are in
FIT_GAMMA_READ = "fit_gamma_read"  # the degradation rate the velocities are read with (see steady_state_ratio)

DISTANCES = "distances"
CONNECTIVITIES = "connectivities"
NEIGHBORS = "neighbors"


def fit_column(name: str, key: str = VELOCITY) -> str:
    """var column of a fitted parameter: ``'fit_beta'`` for the default key, ``'<key>_fit_beta'`` otherwise."""
    return name if key == VELOCITY else f"{key}_{name}"
