"""Label names of the standard chest X-ray datasets, defined once (no imports: config and readers use them)."""

# NIH ChestX-ray14 in the order of CheXNet, MRM, MED-PEFT and medical MAE.
NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NIH_NO_FINDING = "No Finding"

# CheXpert: all 14 observations in the CSV's order, and the 5 competition tasks in the split lists' order.
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
CHEXPERT_COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

# RSNA Pneumonia: the binary task, and the three classes of stage_2_detailed_class_info.csv.
RSNA_LABELS = ("Pneumonia",)
RSNA_CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
