# Shared by the reference scripts (make_reference.R, make_reference_units.R, make_reference_covariance.R,
# make_reference_heldout.R):
# where the reference data live, how a data frame is exported (factors as plain text, no row names), and how a
# fit is run with its warnings and messages captured.
# Source it from the repository root: source(file.path("tests", "reference", "common.R"))

ref_dir <- file.path("tests", "reference")
data_dir <- file.path(ref_dir, "data")
if (!dir.exists(data_dir)) {
  stop("run from the repository root: ", data_dir, " not found")
}

as_plain <- function(frame, columns) {
  frame <- as.data.frame(frame)[, columns]
  for (column in columns) {
    if (is.factor(frame[[column]])) frame[[column]] <- as.character(frame[[column]])
  }
  rownames(frame) <- NULL
  frame
}

# Evaluate `expr` with every warning and message captured; an error becomes list(error = text).
capture <- function(expr) {
  captured <- character()
  t0 <- proc.time()[["elapsed"]]
  value <- tryCatch(
    withCallingHandlers(
      expr,
      warning = function(w) {
        captured <<- c(captured, conditionMessage(w))
        invokeRestart("muffleWarning")
      },
      message = function(m) {
        captured <<- c(captured, trimws(conditionMessage(m)))
        invokeRestart("muffleMessage")
      }
    ),
    error = function(e) list(error = conditionMessage(e))
  )
  list(value = value, messages = captured, seconds = proc.time()[["elapsed"]] - t0)
}

# The nlme correlation object of a covariance structure (mmrm's names; the h variants take varIdent beside
# it), optionally with starting values: over the integer visit index (column visit_index) for the visit
# structures, over the time for sp_exp.
cor_struct <- function(structure, id, time, m, value = NULL) {
  visit_form <- as.formula(sprintf("~ visit_index | %s", id))
  time_form <- as.formula(sprintf("~ %s | %s", time, id))
  base <- sub("h$", "", structure)
  if (structure == "us") {
    if (is.null(value)) corSymm(form = visit_form) else corSymm(value = value, form = visit_form)
  } else if (base == "cs") {
    corCompSymm(value = if (is.null(value)) 0 else value, form = visit_form)
  } else if (base == "ar1") {
    corAR1(value = if (is.null(value)) 0 else value, form = visit_form)
  } else if (base == "toep") {
    corARMA(value = if (is.null(value)) rep(0, m - 1) else value, form = visit_form, p = m - 1)
  } else if (structure == "sp_exp") {
    if (is.null(value)) corExp(form = time_form) else corExp(value = value, form = time_form)
  } else {
    stop("unknown structure ", structure)
  }
}
