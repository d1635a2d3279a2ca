"""The same photo with another skin: the skin's melanin changed, everything else in the picture kept.

A band of real photos differs from another in how its people were photographed (sun, shade, warm
light, studio flash) as well as in their skin, so a check that refuses one band sooner may be
reading either. Changing only the skin, on the same pictures, tells them apart: a check that
judges the picture refuses the face at the same point whatever skin it is given.

Skin is rendered with the dichromatic reflection model (Shafer 1985): in linear light each skin
pixel is a diffuse part, light that entered the skin and came back coloured by it, plus a
surface part, light reflected off the skin's surface with the colour of the light (shine, a
glint), which melanin does not touch. Melanin absorbs in the diffuse part only, following
Beer-Lambert with an absorption that falls with wavelength as lambda^-3.48 (Jacques 1998): more
melanin takes most from blue and least from red. Per pixel the diffuse and surface amounts are
fitted on the face's own skin colour and white; pixels the two do not explain (eyes' irises,
lips, hair, clothes, background) are left as they are, as are catchlights and eye whites (white:
all surface part). A face is taken to a band by the amount of melanin that puts its ITA (the
fairness survey's measure) at the band's centre.

What it leaves out: skin's own texture and shading change little with melanin and are kept, but
subsurface scattering (light spreading under a lighter skin, softening shadows) is not modelled;
pixels clipped to white in the photo have lost their colour and are read as surface reflection,
so a face whose skin is blown out in the photo keeps those patches; the camera's metering is
kept as it was (the same scene, the same exposure), so a darker face does not make the camera
open up. Pure functions; the caller reads the photos."""
from __future__ import annotations

import numpy as np

from edge.align import align
from edge.quality import QUALITY_SIZE, QUALITY_TEMPLATE
from edge.quality import linear_light as to_linear

from .fairness import BANDS, head_mask, ita, skin_pixels, to_srgb

# Melanin's absorption at the sRGB primaries' dominant wavelengths (B, G, R: 465, 549, 611 nm),
# relative to blue: optical density ~ lambda^-3.48.
MELANIN = (np.array([465.0, 549.0, 611.0]) / 465.0) ** -3.48
NEUTRAL = np.ones(3) / np.sqrt(3.0)  # the colour of the light (a white-balanced camera)
FIT_TOLERANCE = 0.15  # fit residual, as a share of the pixel, past which a pixel stops counting as skin
CENTRES = {name: (lo + hi) / 2 for name, lo, hi in BANDS}
CENTRES["very light"], CENTRES["dark"] = 65.0, -45.0  # the open-ended bands' typical skin, not 72.5 / -60


def skin_colour(lin_crop: np.ndarray) -> np.ndarray:
    """Median colour (linear BGR) of the skin patches of an aligned face in linear light."""
    return np.median(skin_pixels(lin_crop), axis=0)


def dichromatic(lin: np.ndarray, skin: np.ndarray, tolerance: float = FIT_TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """The skin's own light (its diffuse part) in each pixel of `lin` (..., 3, linear light) and
    the skin's colour direction (a unit vector): the diffuse and surface amounts fitted per pixel
    on `skin`'s colour and white (least squares, no negative light), the first weighted by how well
    the two explain the pixel, falling off as the fit's residual nears `tolerance` of the pixel."""
    direction = skin / max(float(np.linalg.norm(skin)), 1e-9)
    basis = np.stack([direction, NEUTRAL], axis=1)  # 3 x 2
    p = lin.reshape(-1, 3)
    amounts = np.clip(p @ np.linalg.pinv(basis).T, 0.0, None)
    miss = p - amounts @ basis.T
    residual = np.sqrt(np.einsum("ij,ij->i", miss, miss) / np.maximum(np.einsum("ij,ij->i", p, p), 1e-18))
    return (amounts[:, 0] * np.exp(-(residual / tolerance) ** 2)).reshape(lin.shape[:-1]), direction


def with_melanin(lin: np.ndarray, diffuse: np.ndarray, direction: np.ndarray, extra: float,
                 where: np.ndarray | float = 1.0) -> np.ndarray:
    """`lin` with `extra` melanin (optical density at blue; negative: less) in its diffuse skin."""
    gain = np.exp(-extra * MELANIN) - 1.0
    return lin + (np.asarray(where)[..., None] * diffuse[..., None]) * direction * gain


def melanin_for(crop_bgr: np.ndarray, target_ita: float, lo: float = -3.0, hi: float = 8.0,
                tol: float = 0.01) -> float | None:
    """The extra melanin that puts the aligned face's ITA at `target_ita` (None: out of reach:
    a skin blown out in the photo cannot be darkened, nor one with no diffuse part lightened)."""
    lin = to_linear(crop_bgr)
    diffuse, direction = dichromatic(lin, skin_colour(lin))
    angle = lambda m: ita(to_srgb(with_melanin(lin, diffuse, direction, m)))  # noqa: E731
    if not angle(hi) <= target_ita <= angle(lo):
        return None
    while hi - lo > tol:  # ITA falls as melanin rises
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if angle(mid) > target_ita else (lo, mid)
    return (lo + hi) / 2


def as_band(image: np.ndarray, det, band: str) -> np.ndarray | None:
    """The photo `image` (BGR) with the skin of the face `det` taken to `band`'s centre ITA, the
    rest of the picture unchanged; None where the skin cannot be taken there."""
    crop = align(image, det, QUALITY_TEMPLATE, QUALITY_SIZE).image
    extra = melanin_for(crop, CENTRES[band])
    if extra is None:
        return None
    lin = to_linear(image)
    diffuse, direction = dichromatic(lin, skin_colour(to_linear(crop)))
    return to_srgb(with_melanin(lin, diffuse, direction, extra, head_mask(image.shape, det.box)))
